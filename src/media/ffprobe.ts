/**
 * Probes a video's first video stream with the system ffprobe: codec, pixel format, size, frame
 * count (counted by decoding, not trusted from the container) and frame rate.
 */
import { z } from "zod";
import { KinoError } from "../errors.ts";
import { execTool } from "./exec.ts";

export interface VideoProbe {
  /** e.g. "h264" */
  readonly codec: string;
  /** e.g. "yuv420p" */
  readonly pixFmt: string;
  readonly width: number;
  readonly height: number;
  readonly frames: number;
  /** Frames per second, from the stream's average frame rate. */
  readonly fps: number;
  readonly durationSeconds: number | null;
}

const FfprobeOutput = z.object({
  streams: z
    .array(
      z.object({
        codec_name: z.string(),
        pix_fmt: z.string(),
        width: z.number().int(),
        height: z.number().int(),
        nb_read_frames: z.string(),
        avg_frame_rate: z.string(),
        r_frame_rate: z.string(),
        duration: z.string().optional(),
      }),
    )
    .min(1),
});

/** @param ffprobe the ffprobe binary @default "ffprobe" */
export async function probeVideo(path: string, ffprobe = "ffprobe"): Promise<VideoProbe> {
  const { stdout } = await execTool(ffprobe, [
    "-v", "error",
    "-select_streams", "v:0",
    "-count_frames",
    "-show_entries", "stream=codec_name,pix_fmt,width,height,nb_read_frames,avg_frame_rate,r_frame_rate,duration",
    "-of", "json",
    path,
  ]);
  const parsed = FfprobeOutput.safeParse(JSON.parse(stdout));
  if (!parsed.success) throw new KinoError("MEDIA_TOOL_FAILED", `${path} has no video stream ffprobe can read`);
  const s = parsed.data.streams[0]!;
  const fps = parseRate(s.avg_frame_rate) ?? parseRate(s.r_frame_rate) ?? 0;
  return {
    codec: s.codec_name,
    pixFmt: s.pix_fmt,
    width: s.width,
    height: s.height,
    frames: Number(s.nb_read_frames),
    fps,
    durationSeconds: s.duration === undefined ? null : Number(s.duration),
  };
}

/** "16/1" → 16; "0/0" → null. */
export function parseRate(rate: string): number | null {
  const [num, den] = rate.split("/").map(Number);
  if (num === undefined || !Number.isFinite(num)) return null;
  if (den === undefined) return num;
  return den > 0 && num > 0 ? num / den : null;
}
