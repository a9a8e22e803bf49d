/**
 * The server's one error boundary: whatever a route or fastify throws becomes
 * `{error: {code, message, field}}` with the code's HTTP status. The message names the field first
 * ("frames: must be 4k+1 …"). Errors that are not kino's own are logged with their stack and answered
 * with a generic message: clients never see a stack trace or an internal detail.
 */
import type { FastifyError, FastifyInstance } from "fastify";
import { KinoError } from "../../errors.ts";
import type { Logger } from "../../log.ts";
import type { ErrorInfo } from "../schemas.ts";

export function errorBody(error: KinoError): { error: ErrorInfo } {
  const { field } = error;
  let message = field !== null && !error.message.startsWith(field) ? `${field}: ${error.message}` : error.message;
  // INTERNAL's hint is the CLI's ("rerun with --debug"); a client can do nothing with it.
  if (error.hint !== undefined && error.code !== "INTERNAL") message += ` (${error.hint})`;
  return { error: { code: error.code, message, field } };
}

/** fastify's own errors (body parsing, limits) in kino's catalog; anything else is INTERNAL. */
export function toHttpError(err: unknown, bodyLimitBytes: number): KinoError {
  if (err instanceof KinoError) return err;
  const e = err as Partial<FastifyError>;
  switch (e.code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return new KinoError("PAYLOAD_TOO_LARGE", `the body is larger than the server accepts (${bodyLimitBytes} bytes)`, { field: "body" });
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return new KinoError("UNSUPPORTED_MEDIA_TYPE", "the body's Content-Type is not one the server reads", { field: "body" });
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
      return new KinoError("INVALID_ARGUMENT", "is empty; send a JSON object", { field: "body" });
    case "FST_ERR_CTP_INVALID_CONTENT_LENGTH":
      return new KinoError("INVALID_ARGUMENT", "the Content-Length does not match the body", { field: "body" });
  }
  // JSON.parse's SyntaxError, passed on by fastify's JSON parser with status 400.
  if (e.statusCode === 400 && (err instanceof SyntaxError || e.code === "FST_ERR_CTP_INVALID_JSON_BODY")) {
    return new KinoError("INVALID_ARGUMENT", "is not valid JSON", { field: "body" });
  }
  if (e.statusCode === 413) return new KinoError("PAYLOAD_TOO_LARGE", "the request is too large", { field: "body" });
  return new KinoError("INTERNAL", "internal error; the server's log has the details", { cause: err });
}

export function installErrorHandling(app: FastifyInstance, logger: Logger, bodyLimitBytes: number): void {
  app.setErrorHandler((err, request, reply) => {
    const error = toHttpError(err, bodyLimitBytes);
    if (error.code === "INTERNAL") {
      const cause = err instanceof Error ? (err.stack ?? err.message) : String(err);
      logger.warn(`${request.method} ${request.url}: ${cause}`);
    }
    return reply.status(error.httpStatus).type("application/json").send(errorBody(error));
  });
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split("?")[0] ?? "";
    const error = new KinoError("ROUTE_NOT_FOUND", `no route answers ${request.method} ${path.slice(0, 200)}`);
    return reply.status(404).type("application/json").send(errorBody(error));
  });
}
