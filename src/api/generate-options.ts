/**
 * What a user asks of `generate` (CLI flags, later an HTTP body), and the checks that refuse a bad
 * request before any engine starts: each names the field and the nearest legal value or the fix.
 * Field names are the API's (camelCase); the CLI shows them as flags (--frames-dir).
 */
import { constants } from "node:fs";
import { access, readdir, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { z } from "zod";
import type { ShapeRules } from "../catalog/models.ts";
import { KinoError } from "../errors.ts";

/** User-facing precision names, and the protocol's. */
export const DTYPE_NAMES = { bf16: "bfloat16", fp16: "float16", fp32: "float32" } as const;

export const GenerateOptions = z.object({
  /** A catalog id, a checkpoint folder, or "auto". @default "auto" */
  model: z.string().default("auto"),
  prompt: z.string(),
  /** @default the model's (Wan's standard negative prompt for the real models) */
  negativePrompt: z.string().optional(),
  /** "WIDTHxHEIGHT". @default the model's (832x480; tiny 320x192) */
  size: z.string().optional(),
  /** @default the model's (81; tiny 17) */
  frames: z.number().optional(),
  /** @default the model's (50; tiny 10) */
  steps: z.number().optional(),
  /** Classifier-free guidance scale; 0 turns it off. @default 5 */
  guidance: z.number().optional(),
  /** Flow shift of the scheduler. @default 3 for the catalog's Wan models; a folder's own */
  shift: z.number().optional(),
  /** @default random (and reported) */
  seed: z.number().optional(),
  /** @default the model's (16) */
  fps: z.number().optional(),
  /** @default cuda when the engine sees a GPU, else cpu */
  device: z.enum(["cuda", "cpu"]).optional(),
  /** @default bf16 on cuda, fp32 on cpu */
  dtype: z.enum(["bf16", "fp16", "fp32"]).optional(),
  /** Regional torch.compile of the transformer blocks: slower first job, faster steps (kept on disk). @default false */
  compile: z.boolean().default(false),
  /** VRAM budget such as "12GB" (GiB): the planner keeps the run under it (enforced in the engine). @default the GPU's free VRAM */
  vram: z.string().optional(),
  /** Host RAM budget such as "32GB". @default the machine's */
  ram: z.string().optional(),
  /** A memory-level preset 0..3, or "auto" (the planner chooses). @default "auto" */
  memoryLevel: z.string().optional(),
  /** The transformer's linears: exact, fp8, fp8-weight, int8, int8-dynamic, or auto (exact unless it does not fit). @default exact */
  precision: z.string().optional(),
  /** Build the catalog model's architecture with random weights (timings only). @default false */
  randomWeights: z.boolean().default(false),
  /** The MP4 to write. */
  out: z.string(),
  /** A folder for the PNG frames; must not exist or be empty. */
  framesDir: z.string().optional(),
  /** A PNG that shows the video as it denoises: the latest preview, replaced as each arrives. */
  preview: z.string().optional(),
  /** Steps between previews (and one at the last). @default about ten per run: max(1, round(steps / 10)) */
  previewEvery: z.number().optional(),
});
export type GenerateOptions = z.input<typeof GenerateOptions>;
export type ParsedGenerateOptions = z.output<typeof GenerateOptions>;

/** The largest seed: what every RNG the engine may use accepts. */
export const MAX_SEED = 2 ** 32 - 1;

const invalid = (field: string, message: string) => new KinoError("INVALID_ARGUMENT", message, { field });

/** Parses "832x480" into width and height; throws naming the field otherwise. */
export function parseSize(size: string, shape: ShapeRules): { width: number; height: number } {
  const match = /^(\d+)x(\d+)$/i.exec(size.trim());
  if (match === null) throw invalid("size", `must be WIDTHxHEIGHT, e.g. 832x480; got "${size}"`);
  const width = Number(match[1]);
  const height = Number(match[2]);
  const m = shape.spatialMultiple;
  if (width % m !== 0 || height % m !== 0 || width === 0 || height === 0) {
    const near = (v: number) => Math.max(m, Math.round(v / m) * m);
    throw invalid(
      "size",
      `${width}x${height} is not a multiple of ${m} on both sides (the VAE's 8× times the transformer's 2×2 patch); nearest legal size: ${near(width)}x${near(height)}`,
    );
  }
  return { width, height };
}

/** Checks the numeric fields against the model's shape rules. Pure. */
export function checkNumbers(o: ParsedGenerateOptions, shape: ShapeRules): void {
  if (o.prompt.trim() === "") throw invalid("prompt", "is empty; describe the video to generate");
  if (o.size !== undefined) parseSize(o.size, shape);
  if (o.frames !== undefined) {
    const t = shape.temporalMultiple;
    if (!Number.isInteger(o.frames) || o.frames < 1) throw invalid("frames", `must be a whole number ≥ 1 of the form ${t}k+1 (e.g. 81); got ${o.frames}`);
    if ((o.frames - 1) % t !== 0) {
      const nearest = Math.max(1, Math.round((o.frames - 1) / t) * t + 1);
      throw invalid("frames", `must be ${t}k+1 (1, 5, 9, … 77, 81, 85 …: the VAE packs ${t} frames per latent after the first); got ${o.frames}, nearest: ${nearest}`);
    }
  }
  if (o.steps !== undefined && (!Number.isInteger(o.steps) || o.steps < 1)) {
    throw invalid("steps", `must be a whole number ≥ 1 (50 is Wan's default); got ${o.steps}`);
  }
  if (o.guidance !== undefined && !(Number.isFinite(o.guidance) && o.guidance >= 0)) {
    throw invalid("guidance", `must be ≥ 0 (5 is Wan's default; 0 turns classifier-free guidance off); got ${o.guidance}`);
  }
  if (o.shift !== undefined && !(Number.isFinite(o.shift) && o.shift > 0)) {
    throw invalid("shift", `must be > 0 (3 suits 480p, 5 suits 720p); got ${o.shift}`);
  }
  if (o.seed !== undefined && (!Number.isInteger(o.seed) || o.seed < 0 || o.seed > MAX_SEED)) {
    throw invalid("seed", `must be a whole number from 0 to ${MAX_SEED}; got ${o.seed}`);
  }
  if (o.previewEvery !== undefined && (!Number.isInteger(o.previewEvery) || o.previewEvery < 1)) {
    throw invalid("previewEvery", `must be a whole number of steps ≥ 1; got ${o.previewEvery}`);
  }
  if (o.fps !== undefined && !(Number.isFinite(o.fps) && o.fps > 0 && o.fps <= 240)) {
    throw invalid("fps", `must be a number above 0 and at most 240 (Wan's is 16); got ${o.fps}`);
  }
}

/** Absolute output paths, checked writable. */
export interface CheckedOutputs {
  readonly video: string;
  readonly framesDir: string | null;
  /** The preview PNG, replaced as the run goes; absent or null: no previews. */
  readonly preview?: string | null;
}

/** Previews per run when the caller names none: about ten. */
export function defaultPreviewEvery(steps: number): number {
  return Math.max(1, Math.round(steps / 10));
}

/** Checks the output paths on disk: nothing is written yet, so a bad one costs nothing. */
export async function checkOutputs(o: ParsedGenerateOptions, cwd: string): Promise<CheckedOutputs> {
  const video = resolve(cwd, o.out);
  if (!video.toLowerCase().endsWith(".mp4")) throw invalid("out", `must be a file path ending in .mp4; got "${o.out}"`);
  if (await isDirectory(video)) throw invalid("out", `${video} is a folder; give a file path ending in .mp4`);
  await checkWritableFolder(dirname(video), "out");

  let framesDir: string | null = null;
  if (o.framesDir !== undefined) {
    framesDir = resolve(cwd, o.framesDir);
    const st = await stat(framesDir).catch(() => null);
    if (st !== null && !st.isDirectory()) throw invalid("framesDir", `${framesDir} is a file; give a folder (new or empty)`);
    if (st !== null) {
      const entries = await readdir(framesDir);
      if (entries.length > 0) {
        throw invalid("framesDir", `${framesDir} is not empty (${entries.length} entries); give a new or empty folder so frames of different runs don't mix`);
      }
    } else {
      await checkWritableFolder(dirname(framesDir), "framesDir");
    }
  }
  let preview: string | null = null;
  if (o.previewEvery !== undefined && o.preview === undefined) {
    throw invalid("previewEvery", "sets how often previews come, but none were asked for: add --preview FILE.png (where to write them)");
  }
  if (o.preview !== undefined) {
    preview = resolve(cwd, o.preview);
    if (!preview.toLowerCase().endsWith(".png")) throw invalid("preview", `must be a file path ending in .png; got "${o.preview}"`);
    if (await isDirectory(preview)) throw invalid("preview", `${preview} is a folder; give a file path ending in .png`);
    await checkWritableFolder(dirname(preview), "preview");
  }
  return { video, framesDir, preview };
}

async function checkWritableFolder(dir: string, field: string): Promise<void> {
  if (!(await isDirectory(dir))) throw invalid(field, `the folder ${dir} does not exist; create it first`);
  const writable = await access(dir, constants.W_OK).then(() => true, () => false);
  if (!writable) throw invalid(field, `the folder ${dir} is not writable; choose another or fix its permissions`);
}

function isDirectory(path: string): Promise<boolean> {
  return stat(path).then((s) => s.isDirectory(), () => false);
}
