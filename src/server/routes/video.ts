/** A job's video, with HTTP Range support (206 partial content, 416 for a range past the end). */
import { createReadStream } from "node:fs";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import rangeParser from "range-parser";
import { KinoError } from "../../errors.ts";
import type { VideoFile } from "../jobs/service.ts";
import { ErrorBody, JobIdParams } from "../schemas.ts";
import type { RouteContext } from "./context.ts";

export const RANGE_HEADER = { name: "Range", description: "bytes=START-END, bytes=START- or bytes=-SUFFIX." };

export async function videoRoutes(app: FastifyInstance, ctx: RouteContext): Promise<void> {
  ctx.table.add(app, {
    method: "GET",
    url: "/api/jobs/:id/video",
    operationId: "jobVideo",
    summary: "The job's video (MP4)",
    description: "Supports a single byte range (Range: bytes=START-END); several ranges are answered with the whole file.",
    tags: ["jobs"],
    params: JobIdParams,
    headers: [RANGE_HEADER],
    responses: {
      200: { description: "The whole video.", contentType: "video/mp4" },
      206: { description: "The range asked for.", contentType: "video/mp4" },
      404: { description: "No such job.", schema: ErrorBody },
      409: { description: "VIDEO_NOT_AVAILABLE: the job has not completed.", schema: ErrorBody },
      416: { description: "The range lies past the end of the file.", schema: ErrorBody },
    },
    handler: async ({ params }, request, reply) => sendVideo(await ctx.service.video(params.id), request, reply),
  });
}

/**
 * Sends a video file, whole or the single byte range the request asks for.
 * @throws KinoError RANGE_NOT_SATISFIABLE for a range past the end
 */
export function sendVideo(video: VideoFile, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  void reply
    .header("accept-ranges", "bytes")
    .header("content-type", video.contentType)
    .header("content-disposition", `inline; filename="${video.fileName}"`);
  const header = request.headers.range;
  const ranges = header === undefined ? -2 : rangeParser(video.bytes, header, { combine: true });
  if (ranges === -1) {
    void reply.header("content-range", `bytes */${video.bytes}`);
    throw new KinoError("RANGE_NOT_SATISFIABLE", `the range ${header} lies outside the video's ${video.bytes} bytes`, { field: "Range" });
  }
  // No range, a malformed one, another unit or several ranges: the whole file (RFC 9110 allows ignoring Range).
  if (ranges === -2 || ranges.type !== "bytes" || ranges.length !== 1) {
    return reply.header("content-length", video.bytes).send(createReadStream(video.path));
  }
  const { start, end } = ranges[0]!;
  return reply
    .status(206)
    .header("content-range", `bytes ${start}-${end}/${video.bytes}`)
    .header("content-length", end - start + 1)
    .send(createReadStream(video.path, { start, end }));
}
