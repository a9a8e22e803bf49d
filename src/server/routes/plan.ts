/** POST /api/plan: the planner's estimate for a request before it is submitted (what the web UI shows). */
import type { FastifyInstance } from "fastify";
import { ErrorBody, PlanBody, PlanEstimate } from "../schemas.ts";
import type { RouteContext } from "./context.ts";

export async function planRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  ctx.table.add(app, {
    method: "POST",
    url: "/api/plan",
    operationId: "planJob",
    summary: "Estimate a job's memory and time",
    description:
      "Plans the request as admission would, on the server's largest GPU (on the H100 profile where the server has none, as the note says): " +
      "predicted peak VRAM and RAM, time, and where the transformer lives. Nothing is queued.",
    tags: ["jobs"],
    body: PlanBody,
    responses: {
      200: { description: "The estimate (null for kino's tiny model, which is not planned).", schema: PlanEstimate },
      400: { description: "A field is wrong; `field` names it.", schema: ErrorBody },
      404: { description: "Unknown model.", schema: ErrorBody },
      422: { description: "INFEASIBLE: it fits on none of the server's GPUs; the message names the smallest budget.", schema: ErrorBody },
    },
    handler: async ({ body }) => ctx.service.estimate(body),
  });
}
