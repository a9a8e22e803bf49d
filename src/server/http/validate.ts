/**
 * Parses what a client sent (body, path parameters, query, headers) with a zod schema, and turns the
 * first problem into INVALID_ARGUMENT naming the field, as `kino generate` names its flags (the
 * error handler puts the field in front of the message).
 */
import type { z } from "zod";
import { KinoError } from "../../errors.ts";

/**
 * @param where what the value is when the problem is the value as a whole ("body", "query" …)
 * @throws KinoError INVALID_ARGUMENT with the field's path ("frames", "size") as `field`
 */
export function parseInput<S extends z.ZodType>(schema: S, value: unknown, where: string): z.output<S> {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0]!;
  if (issue.code === "unrecognized_keys") {
    const key = issue.keys[0] ?? "";
    const prefix = issue.path.length > 0 ? `${issue.path.join(".")}.` : "";
    throw new KinoError("INVALID_ARGUMENT", "is not a field of this request; remove it (GET /openapi.json lists the fields)", {
      field: prefix + key,
    });
  }
  const field = issue.path.length > 0 ? issue.path.map(String).join(".") : where;
  const value_ = issue.path.reduce<unknown>((v, k) => (v !== null && typeof v === "object" ? (v as Record<PropertyKey, unknown>)[k] : undefined), value);
  const message = issue.code === "invalid_type" && value_ === undefined && issue.path.length > 0 ? "is required" : issue.message;
  throw new KinoError("INVALID_ARGUMENT", message, { field });
}
