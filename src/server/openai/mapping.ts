/**
 * OpenAI's video fields ↔ kino's jobs. A create body becomes a native JobRequest (size and seconds
 * turned into width, height and frames by the model's rules, refused with the OpenAI field named
 * when the model cannot do them); a job and its events become an OpenAI video object.
 */
import { catalogIds, findCatalogModel, WAN21_480P_DEFAULTS, WAN21_SHAPE, type CatalogModel } from "../../catalog/models.ts";
import { AUTO_MODEL } from "../../catalog/resolve.ts";
import { KinoError } from "../../errors.ts";
import type { StoredEvent } from "../jobs/store.ts";
import type { Job, JobEventData, JobRequest } from "../schemas.ts";
import type { Video, VideoCreateBody, VideoStatus } from "./schemas.ts";

/** Clip lengths kino accepts, in seconds: at least one latent frame after the first, and a bounded amount of work. */
export const MIN_SECONDS = 0.25;
export const MAX_SECONDS = 20;

const invalid = (field: string, message: string) => new KinoError("INVALID_ARGUMENT", message, { field });

/** Native request fields → the OpenAI names a client sent, for errors raised after the mapping. */
const OPENAI_FIELD: Readonly<Record<string, string>> = { frames: "seconds", negativePrompt: "negative_prompt" };

export function openAIField(field: string | null): string | null {
  return field === null ? null : (OPENAI_FIELD[field] ?? field);
}

/**
 * The native job request for an OpenAI create body.
 * @throws KinoError INVALID_ARGUMENT naming model, size, seconds or input_reference
 */
export function toJobRequest(body: VideoCreateBody): JobRequest {
  if (body.input_reference !== undefined) {
    throw invalid("input_reference", "kino's models are text-to-video: an image reference cannot guide them; send the prompt alone");
  }
  const modelId = body.model ?? AUTO_MODEL;
  const model = modelId === AUTO_MODEL ? null : findCatalogModel(modelId);
  if (model === undefined) {
    throw invalid("model", `"${modelId.slice(0, 100)}" is not a model this server runs (OpenAI's models are not kino's); use one of ${catalogIds().join(", ")} or auto (GET /api/models)`);
  }
  // OpenAI's video API has no way to show previews: none are taken.
  const request: JobRequest = { model: modelId, prompt: body.prompt, previewEvery: 0 };
  if (body.size !== undefined) request.size = checkSize(body.size, model);
  if (body.seconds !== undefined) request.frames = secondsToFrames(body.seconds, model);
  if (body.negative_prompt !== undefined) request.negativePrompt = body.negative_prompt;
  if (body.seed !== undefined) request.seed = body.seed;
  if (body.steps !== undefined) request.steps = body.steps;
  if (body.guidance !== undefined) request.guidance = body.guidance;
  return request;
}

/** Sizes to suggest for a model: its default, portrait and landscape. */
export function suggestedSizes(model: CatalogModel | null): string[] {
  const { width, height } = model?.defaults ?? WAN21_480P_DEFAULTS;
  return [`${width}x${height}`, `${height}x${width}`];
}

function checkSize(size: string, model: CatalogModel | null): string {
  const m = (model?.shape ?? WAN21_SHAPE).spatialMultiple;
  const match = /^(\d{1,5})x(\d{1,5})$/.exec(size.trim());
  const width = Number(match?.[1]);
  const height = Number(match?.[2]);
  if (match !== null && width > 0 && height > 0 && width % m === 0 && height % m === 0) return `${width}x${height}`;
  const near = (v: number) => Math.max(m, Math.round(v / m) * m);
  const nearest = match === null ? "" : `; the nearest valid one is ${near(width)}x${near(height)}`;
  throw invalid(
    "size",
    `${model?.id ?? "the model"} cannot make "${size.slice(0, 40)}": valid sizes are WIDTHxHEIGHT with both sides multiples of ${m}, ` +
      `such as ${suggestedSizes(model).join(", ")}, 1280x720 or 720x1280${nearest}`,
  );
}

/**
 * Seconds → frames: seconds × fps, rounded to the nearest count the VAE accepts (4k+1).
 * @throws KinoError INVALID_ARGUMENT naming seconds outside [MIN_SECONDS, MAX_SECONDS]
 */
export function secondsToFrames(seconds: string | number, model: CatalogModel | null): number {
  const fps = model?.defaults.fps ?? WAN21_480P_DEFAULTS.fps;
  const t = (model?.shape ?? WAN21_SHAPE).temporalMultiple;
  const text = String(seconds).trim();
  const value = /^\d+(\.\d+)?$/.test(text) ? Number(text) : Number.NaN;
  if (!(value >= MIN_SECONDS && value <= MAX_SECONDS)) {
    throw invalid(
      "seconds",
      `must be a number of seconds from ${MIN_SECONDS} to ${MAX_SECONDS} (frames = seconds × ${fps} fps, rounded to ${t}k+1: "4" makes ` +
        `${framesFor(4, fps, t)} frames, "5" makes ${framesFor(5, fps, t)}); got "${text.slice(0, 40)}"`,
    );
  }
  return framesFor(value, fps, t);
}

function framesFor(seconds: number, fps: number, t: number): number {
  return Math.max(1, Math.round((seconds * fps - 1) / t)) * t + 1;
}

const STATUS: Readonly<Record<Job["status"], VideoStatus>> = {
  queued: "queued",
  running: "in_progress",
  completed: "completed",
  failed: "failed",
  cancelled: "failed",
};

/** Where each phase starts on the 0–100 scale; denoising fills most of it. */
const PHASE_START = { load: 0, text_encode: 2, denoise: 5, decode: 92, encode: 97 } as const;
const DENOISE_SPAN = PHASE_START.decode - PHASE_START.denoise;

/** The percentage a running job has reached, from its latest progress event. */
export function progressPercent(events: readonly StoredEvent[]): number {
  let last: Extract<JobEventData, { type: "progress" }> | undefined;
  for (const e of events) if (e.data.type === "progress") last = e.data;
  if (last === undefined) return 0;
  if (last.phase === "denoise" && last.step !== null && last.total !== null && last.total > 0) {
    return Math.floor(PHASE_START.denoise + (DENOISE_SPAN * last.step) / last.total);
  }
  return PHASE_START[last.phase];
}

const unixSeconds = (iso: string | null) => (iso === null ? null : Math.floor(Date.parse(iso) / 1000));

/** The OpenAI video object of a job; `events` matter only while it runs (its progress). */
export function videoView(job: Job, events: readonly StoredEvent[]): Video {
  const { params } = job;
  const fps = params.fps ?? findCatalogModel(job.model)?.defaults.fps ?? WAN21_480P_DEFAULTS.fps;
  const frames = job.result?.frames ?? params.frames;
  let error: Video["error"] = null;
  if (job.status === "failed" && job.error !== null) error = { code: job.error.code, message: job.error.message };
  if (job.status === "cancelled") error = { code: "CANCELLED", message: "the video was cancelled before it was finished" };
  return {
    id: job.id,
    object: "video",
    created_at: unixSeconds(job.createdAt)!,
    completed_at: job.status === "completed" ? unixSeconds(job.finishedAt) : null,
    expires_at: null,
    status: STATUS[job.status],
    progress: job.status === "completed" ? 100 : job.status === "running" ? progressPercent(events) : 0,
    model: job.model,
    prompt: params.prompt,
    remixed_from_video_id: null,
    seconds: String(Math.round((frames / fps) * 100) / 100),
    size: `${job.result?.width ?? params.width}x${job.result?.height ?? params.height}`,
    error,
  };
}
