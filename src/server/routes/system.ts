/** The server's own routes: models, loaded engines (ps), health and the OpenAPI document. */
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import { openApiDocument, type OpenApiInfo } from "../http/openapi.ts";
import { Health, ModelList, ProcessList } from "../schemas.ts";
import type { RouteContext } from "./context.ts";

export async function systemRoutes(app: FastifyInstance, ctx: RouteContext & { readonly info: OpenApiInfo }): Promise<void> {
  const { table, service, scheduler } = ctx;

  table.add(app, {
    method: "GET",
    url: "/api/models",
    operationId: "listModels",
    summary: "The models this server can run",
    tags: ["models"],
    responses: { 200: { description: "The catalog, what is downloaded, and which engines hold each model.", schema: ModelList } },
    handler: async () => service.models(),
  });

  table.add(app, {
    method: "GET",
    url: "/api/ps",
    operationId: "listEngines",
    summary: "The engines: device, loaded model, memory, keep-alive",
    tags: ["engines"],
    responses: { 200: { description: "One entry per engine (one per GPU, one on a CPU machine).", schema: ProcessList } },
    handler: async () => ({ engines: scheduler.engines() }),
  });

  table.add(app, {
    method: "GET",
    url: "/api/health",
    operationId: "health",
    summary: "Whether the engines can run jobs",
    description: "ok: every engine is usable; degraded: some failed to start (jobs still run); unavailable (503): none can run jobs.",
    tags: ["engines"],
    responses: { 200: { description: "ok or degraded.", schema: Health }, 503: { description: "unavailable.", schema: Health } },
    handler: async (_input, _request, reply) => {
      const health = await scheduler.health();
      return reply.status(health.status === "unavailable" ? 503 : 200).send(health);
    },
  });

  let document: Record<string, unknown> | null = null;
  table.add(app, {
    method: "GET",
    url: "/openapi.json",
    operationId: "openapi",
    summary: "This document",
    tags: ["meta"],
    public: true,
    responses: { 200: { description: "OpenAPI 3.1, generated from the routes' schemas.", schema: z.record(z.string(), z.unknown()) } },
    // Built on first use, once every module has declared its routes.
    handler: async () => (document ??= openApiDocument(table.routes, ctx.info)),
  });
}
