/** The native job routes: submit, list, look up, cancel, and follow a job's events (SSE). */
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import { SseStream } from "../http/sse.ts";
import { parseInput } from "../http/validate.ts";
import { ErrorBody, Job, JobEvent, JobIdParams, JobList, JobListQuery, JobRequest, LastEventId } from "../schemas.ts";
import type { RouteContext } from "./context.ts";

const error = (description: string) => ({ description, schema: ErrorBody });

export async function jobRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  const { table, service } = ctx;

  table.add(app, {
    method: "POST",
    url: "/api/jobs",
    operationId: "submitJob",
    summary: "Submit a job",
    description: "Checks the request, plans it against the server's GPUs and queues it. Answers at once; follow the job's events for progress.",
    tags: ["jobs"],
    body: JobRequest,
    responses: {
      202: { description: "Queued (or already running).", schema: Job },
      400: error("A field is wrong; `field` names it."),
      404: error("Unknown or not downloaded model."),
      413: error("The body is too large."),
      422: error("INFEASIBLE: it fits on none of the server's GPUs; the message names the smallest budget."),
      429: error("QUEUE_FULL: retry later."),
      503: error("The server is shutting down, or no engine can run jobs."),
    },
    handler: async ({ body }, _request, reply) => {
      const job = await service.submit(body);
      return reply.status(202).header("location", job.links.self).send(job);
    },
  });

  table.add(app, {
    method: "GET",
    url: "/api/jobs",
    operationId: "listJobs",
    summary: "List jobs, newest first",
    tags: ["jobs"],
    query: JobListQuery,
    responses: { 200: { description: "A page of jobs; pass nextCursor as cursor for the next.", schema: JobList }, 400: error("A bad query parameter.") },
    handler: async ({ query }) => service.list(query),
  });

  table.add(app, {
    method: "GET",
    url: "/api/jobs/:id",
    operationId: "getJob",
    summary: "A job",
    tags: ["jobs"],
    params: JobIdParams,
    responses: { 200: { description: "The job.", schema: Job }, 400: error("Not a job id."), 404: error("No such job.") },
    handler: async ({ params }) => service.get(params.id),
  });

  table.add(app, {
    method: "POST",
    url: "/api/jobs/:id/cancel",
    operationId: "cancelJob",
    summary: "Cancel a job",
    description: "A queued job is cancelled at once; a running one between denoising steps (its `cancelled` event follows).",
    tags: ["jobs"],
    params: JobIdParams,
    responses: {
      202: { description: "Cancelled, or cancelling (cancelRequested).", schema: Job },
      404: error("No such job."),
      409: error("JOB_FINISHED: it already ended."),
    },
    handler: async ({ params }, _request, reply) => reply.status(202).send(await service.cancel(params.id)),
  });

  table.add(app, {
    method: "GET",
    url: "/api/jobs/:id/events",
    operationId: "jobEvents",
    summary: "Follow a job's events (server-sent events)",
    description:
      "Events: queued, started, model.loading, progress, preview (an image at a denoising step, served at its url), output, notice, then " +
      "exactly one of completed, failed, cancelled, after which the stream ends. Each has an id; reconnecting with Last-Event-ID (or ?after=) " +
      "replays what came after it.",
    tags: ["jobs"],
    params: JobIdParams,
    query: z.strictObject({ after: LastEventId.optional() }),
    headers: [{ name: "Last-Event-ID", description: "Resume after this event id (browsers send it when they reconnect)." }],
    responses: {
      200: { description: "One SSE event per job event; `data` is the JSON below.", schema: JobEvent, contentType: "text/event-stream" },
      400: error("A bad Last-Event-ID."),
      404: error("No such job."),
    },
    handler: async ({ params, query }, request, reply) => {
      const header = request.headers["last-event-id"];
      const after = Number(header !== undefined ? parseInput(LastEventId, header, "Last-Event-ID") : (query.after ?? 0));
      // Looked up before the stream opens, so an unknown job is a JSON 404, not an empty stream.
      await service.get(params.id);
      const stream = new SseStream(reply);
      ctx.streams.add(stream);
      try {
        const follow = await service.follow(params.id, after, (event) =>
          stream.send(event.seq, event.data.type, { seq: event.seq, jobId: event.jobId, at: new Date(event.at).toISOString(), data: event.data }),
        );
        void stream.closed().then(() => follow.stop());
        await follow.ended;
      } finally {
        stream.end();
        ctx.streams.delete(stream);
      }
    },
  });
}
