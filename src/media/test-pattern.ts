/**
 * Renders ffmpeg's test pattern as a job's outputs: an H.264/yuv420p MP4 and/or a PNG sequence of
 * the job's size, frame count and rate, written under temporary names and renamed into place. The
 * FakeEngine uses it so that tests above the engine seam see real files.
 */
import { randomBytes } from "node:crypto";
import { mkdir, readdir, rename, rm, rmdir } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { execTool } from "./exec.ts";

export interface PatternSpec {
  readonly width: number;
  readonly height: number;
  readonly frames: number;
  readonly fps: number;
}

function lavfiInput(spec: PatternSpec): string[] {
  return ["-f", "lavfi", "-i", `testsrc=size=${spec.width}x${spec.height}:rate=${spec.fps}`, "-frames:v", String(spec.frames)];
}

function tempSibling(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${randomBytes(4).toString("hex")}`);
}

export async function renderPatternVideo(spec: PatternSpec, out: string, ffmpeg = "ffmpeg", signal?: AbortSignal): Promise<void> {
  const tmp = tempSibling(out);
  try {
    await execTool(
      ffmpeg,
      ["-v", "error", "-y", ...lavfiInput(spec), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", tmp],
      signal,
    );
    await rename(tmp, out);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** Writes frame_00000.png … into `dir`, which must not exist or be empty. */
export async function renderPatternFrames(spec: PatternSpec, dir: string, ffmpeg = "ffmpeg", signal?: AbortSignal): Promise<void> {
  const tmp = tempSibling(dir);
  try {
    await mkdir(tmp);
    await execTool(ffmpeg, ["-v", "error", "-y", ...lavfiInput(spec), "-start_number", "0", join(tmp, "frame_%05d.png")], signal);
    // rename() replaces an empty folder but not a full one; an existing empty target is removed first.
    if ((await readdir(dir).catch(() => null))?.length === 0) await rmdir(dir);
    await rename(tmp, dir);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}
