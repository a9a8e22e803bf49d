/**
 * OpenAI-compatible /v1/videos as a RoutePlugin over the job service: create (JSON or
 * multipart/form-data, which the official client sends), retrieve, list, delete and content
 * download. A video is a kino job under the same id. Errors take OpenAI's shape
 * (`{error: {message, type, param, code}}`) within these routes only.
 *
 * The official `openai` npm client works pointed at kino: `new OpenAI({ baseURL: "http://host:port/v1",
 * apiKey: <kino's key, or anything when it has none> })`.
 */
import multipart from "@fastify/multipart";
import type { FastifyInstance } from "fastify";
import { KinoError } from "../../errors.ts";
import { errorBody, toHttpError } from "../http/errors.ts";
import type { RoutePlugin } from "../app.ts";
import type { JobService } from "../jobs/service.ts";
import { JobIdParams, type Job } from "../schemas.ts";
import { RANGE_HEADER, sendVideo } from "../routes/video.ts";
import { openAIField, toJobRequest, videoView } from "./mapping.ts";
import { ContentQuery, OpenAIErrorBody, Video, VideoCreateBody, VideoDeleted, VideoList, VideoListQuery } from "./schemas.ts";

const TAGS = ["openai"];
const error = (description: string) => ({ description, schema: OpenAIErrorBody });

export const openaiRoutes: RoutePlugin = async (app, ctx) => {
  const { table, service } = ctx;
  const bodyLimit = app.initialConfig.bodyLimit ?? 1024 * 1024;
  installOpenAIErrors(app, bodyLimit);
  await app.register(multipart, {
    attachFieldsToBody: "keyValues",
    // The body limit does not bound multipart bodies: these do.
    limits: { fieldSize: bodyLimit, fields: 20, files: 1, fileSize: bodyLimit, parts: 21 },
    // A file (input_reference) is read and dropped: the body's check refuses it by name.
    onFile: async (part) => {
      for await (const _ of part.file);
      (part as unknown as { value: unknown }).value = { file: part.filename };
    },
  });

  const view = async (job: Job) => videoView(job, job.status === "running" ? await service.events(job.id) : []);

  table.add(app, {
    method: "POST",
    url: "/v1/videos",
    operationId: "openaiCreateVideo",
    summary: "Create a video (OpenAI-compatible)",
    description:
      "JSON or multipart/form-data. `model` is a kino id or auto; `size` WIDTHxHEIGHT (multiples of 16); `seconds` becomes frames = " +
      "seconds × fps rounded to 4k+1. kino extensions: seed, steps, guidance, negative_prompt.",
    tags: TAGS,
    body: VideoCreateBody,
    bodyTypes: ["application/json", "multipart/form-data"],
    responses: {
      200: { description: "The video, queued (or already in progress).", schema: Video },
      400: error("A field is wrong; `param` names it."),
      404: error("The model is not downloaded."),
      422: error("INFEASIBLE: it fits on none of the server's GPUs."),
      429: error("QUEUE_FULL: retry later."),
    },
    handler: async ({ body }) => view(await submit(service, toJobRequest(body))),
  });

  table.add(app, {
    method: "GET",
    url: "/v1/videos",
    operationId: "openaiListVideos",
    summary: "List videos (OpenAI-compatible)",
    tags: TAGS,
    query: VideoListQuery,
    responses: { 200: { description: "A page; pass last_id as after for the next.", schema: VideoList }, 400: error("A bad query parameter.") },
    handler: async ({ query }) => {
      const cursor = query.after === undefined ? undefined : await service.cursorOf(query.after).catch(renameNotFound("after"));
      const page = await service.list({ limit: query.limit, cursor, order: query.order });
      const data = await Promise.all(page.jobs.map(view));
      return { object: "list", data, first_id: data[0]?.id ?? null, last_id: data.at(-1)?.id ?? null, has_more: page.nextCursor !== null };
    },
  });

  table.add(app, {
    method: "GET",
    url: "/v1/videos/:id",
    operationId: "openaiRetrieveVideo",
    summary: "A video (OpenAI-compatible)",
    tags: TAGS,
    params: JobIdParams,
    responses: { 200: { description: "The video.", schema: Video }, 400: error("Not a video id."), 404: error("No such video.") },
    handler: async ({ params }) => view(await service.get(params.id)),
  });

  table.add(app, {
    method: "DELETE",
    url: "/v1/videos/:id",
    operationId: "openaiDeleteVideo",
    summary: "Delete a video (OpenAI-compatible)",
    description: "Removes the video's record and files; one still queued or running is cancelled first (a running one stops between steps).",
    tags: TAGS,
    params: JobIdParams,
    responses: { 200: { description: "Deleted.", schema: VideoDeleted }, 404: error("No such video.") },
    handler: async ({ params }) => {
      await service.delete(params.id);
      return { id: params.id, object: "video.deleted", deleted: true };
    },
  });

  table.add(app, {
    method: "GET",
    url: "/v1/videos/:id/content",
    operationId: "openaiVideoContent",
    summary: "Download a video's MP4 (OpenAI-compatible)",
    description: "Supports a single byte range. Only the video variant exists: kino makes no thumbnail or spritesheet.",
    tags: TAGS,
    params: JobIdParams,
    query: ContentQuery,
    headers: [RANGE_HEADER],
    responses: {
      200: { description: "The whole video.", contentType: "video/mp4" },
      206: { description: "The range asked for.", contentType: "video/mp4" },
      400: error("A variant other than video."),
      404: error("No such video."),
      409: error("VIDEO_NOT_AVAILABLE: not completed."),
      416: error("The range lies past the end of the file."),
    },
    handler: async ({ params, query }, request, reply) => {
      if (query.variant !== "video") {
        throw new KinoError("INVALID_ARGUMENT", `kino makes no ${query.variant}; ask for the video variant (the default)`, { field: "variant" });
      }
      return sendVideo(await service.video(params.id), request, reply);
    },
  });
};

/** Submits the mapped request; errors name the OpenAI field the client sent (seconds, not frames). */
async function submit(service: JobService, request: ReturnType<typeof toJobRequest>): Promise<Job> {
  try {
    return await service.submit(request);
  } catch (err) {
    const e = toHttpError(err, 0);
    if (e.field === null || openAIField(e.field) === e.field) throw err;
    throw new KinoError(e.code, e.message, { field: openAIField(e.field), cause: err });
  }
}

/** A cursor naming no job is the query's fault, not a missing resource. */
function renameNotFound(field: string) {
  return (err: unknown): never => {
    const e = toHttpError(err, 0);
    if (e.code !== "JOB_NOT_FOUND") throw err;
    throw new KinoError("INVALID_ARGUMENT", `names no video (${e.message})`, { field });
  };
}

const ERROR_TYPES: ReadonlyArray<[number, string]> = [
  [401, "authentication_error"],
  [403, "permission_error"],
  [404, "not_found_error"],
  [429, "rate_limit_error"],
];

/** kino's errors in OpenAI's shape, for the routes of this plugin only (fastify scopes the handler). */
function installOpenAIErrors(app: FastifyInstance, bodyLimit: number): void {
  app.setErrorHandler((err, _request, reply) => {
    const e = toHttpError(err, bodyLimit);
    if (e.code === "INTERNAL") throw err;
    const { message, field } = errorBody(e).error;
    const status = e.httpStatus;
    const type = ERROR_TYPES.find(([s]) => s === status)?.[1] ?? (status >= 500 ? "server_error" : "invalid_request_error");
    return reply.status(status).type("application/json").send({ error: { message, type, param: field, code: e.code } });
  });
}
