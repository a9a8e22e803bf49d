/** A job's previews: the PNG each `preview` event points at. */
import type { FastifyInstance } from "fastify";
import { ErrorBody, PreviewParams } from "../schemas.ts";
import type { RouteContext } from "./context.ts";

export async function previewRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  ctx.table.add(app, {
    method: "GET",
    url: "/api/jobs/:id/previews/:step",
    operationId: "jobPreview",
    summary: "A preview the job took while it denoised (PNG)",
    description:
      "The middle frame of the clean video the model predicted at that step, at the latents' resolution (width/8 x height/8). " +
      "The job's `preview` events name the steps that have one, as their url. Kept with the job once it completed; a job that did not keeps none.",
    tags: ["jobs"],
    params: PreviewParams,
    responses: {
      200: { description: "The image.", contentType: "image/png" },
      400: { description: "Not a job id, or not a step number.", schema: ErrorBody },
      404: { description: "JOB_NOT_FOUND, or PREVIEW_NOT_FOUND: no preview of that step (not taken, not yet, or not kept).", schema: ErrorBody },
    },
    handler: async ({ params }, _request, reply) => {
      const png = await ctx.service.preview(params.id, Number(params.step));
      // The file of a step is rewritten when the job runs again (a retry, a requeue): always revalidated.
      return reply.header("content-type", "image/png").header("cache-control", "no-cache").header("x-content-type-options", "nosniff").send(png);
    },
  });
}
