/**
 * Runs one job on one engine slot, from "started" to its terminal event: make the tiny model if
 * needed, plan it for the engine's GPU, load the model unless the engine holds it with that plan,
 * generate into a temporary file in the job's folder, rename it into place, record the artifact and
 * the result. How it ends:
 *
 * - completed: the video is at <dataDir>/jobs/<id>/video.mp4;
 * - cancelled: the client asked (the engine stops between steps);
 * - back to queued: the server is shutting down (graceful shutdown requeues, see recovery.ts);
 * - failed: anything else, with the error's code, message and field; an OOM is retried once first,
 *   with a safer plan where the job is planned;
 *   an engine that died (crash, SIGKILL, stall) fails this job and is replaced for the next one.
 */
import { randomUUID } from "node:crypto";
import { mkdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { KinoError, toKinoError } from "../../errors.ts";
import type { Logger } from "../../log.ts";
import type { GenerateResult } from "../../protocol/engine.ts";
import type { Clock } from "../clock.ts";
import { jobFile, jobFolder } from "../jobs/files.ts";
import type { JobJournal } from "../jobs/journal.ts";
import type { StoredArtifact, StoredJob } from "../jobs/store.ts";
import { artifactView } from "../jobs/view.ts";
import type { ErrorInfo, JobResult } from "../schemas.ts";
import { describeDecode, describePlacement, type Plan } from "../../planner/plan.ts";
import { planOn } from "./admission.ts";
import { jobSpecFor, modelIdentity, modelSpecFor, sameLoad } from "./model-spec.ts";
import { decideOomRetry, isEngineFailure } from "./policy.ts";
import { ProgressTracker } from "./progress.ts";
import type { EngineSlot } from "./slot.ts";
import { ensureTinyModel, hasCheckpoint, type MakeTiny } from "./tiny-model.ts";

/** Why a running job's signal was aborted. */
export const SHUTDOWN = "shutdown";
export const CANCEL = "cancel";

export const VIDEO_FILE = "video.mp4";

export interface RunJobDeps {
  readonly journal: JobJournal;
  readonly clock: Clock;
  readonly logger: Logger;
  readonly dataDir: string;
  /** The engine's runtime cache (attention choices, compiled kernels). */
  readonly cacheDir: string;
  readonly makeTiny: MakeTiny;
  /** Runs a model load; the scheduler lets one run at a time. */
  readonly exclusiveLoad: <T>(load: () => Promise<T>) => Promise<T>;
  readonly defaultKeepAliveMs: number;
}

/** Runs the job to its end; never rejects (every outcome is recorded on the job). */
export async function runJob(job: StoredJob, slot: EngineSlot, signal: AbortSignal, deps: RunJobDeps): Promise<void> {
  const { journal, logger } = deps;
  const id = job.id;
  const attempt = job.attempts + 1;
  const partial = join(jobFolder(deps.dataDir, id), `.video-${attempt}.partial.mp4`);
  let engineDied = false;
  try {
    await journal.update(id, { status: "running", startedAt: deps.clock.now(), attempts: attempt }, { type: "started", attempt, engine: slot.index });
    await slot.ensureAlive();
    const submission = job.submission;
    if (submission.model.tiny && submission.model.path !== null && !(await hasCheckpoint(submission.model.path))) {
      await journal.note(id, { type: "notice", message: `making kino's tiny model in ${submission.model.path} (once; a few seconds)` });
      await ensureTinyModel(submission.model.path, deps.makeTiny);
    }
    await mkdir(jobFolder(deps.dataDir, id), { recursive: true });
    const result = await generateWithOomRetry(job, slot, partial, signal, deps);
    const video = jobFile(deps.dataDir, id, VIDEO_FILE);
    await rename(partial, video);
    const artifact: StoredArtifact = { id: randomUUID(), kind: "video", file: VIDEO_FILE, contentType: "video/mp4", bytes: (await stat(video)).size };
    await journal.update(id, { addArtifact: artifact }, { type: "output", artifact: artifactView(id, artifact) });
    const summary = resultSummary(result);
    await journal.update(id, { status: "completed", finishedAt: deps.clock.now(), result: summary }, { type: "completed", result: summary });
  } catch (err) {
    // Nothing of a job that did not complete is kept (the engine's own temporary files included).
    await rm(jobFolder(deps.dataDir, id), { recursive: true, force: true }).catch(() => {});
    const error = toKinoError(err);
    engineDied = isEngineFailure(error.code) && !signal.aborted;
    await settleFailure(id, error, signal, deps).catch((e: unknown) => logger.warn(`job ${id}: could not record how it ended: ${toKinoError(e).message}`));
  } finally {
    if (engineDied) {
      void slot.replaceAfterFailure(`it died during job ${id}`);
    } else {
      slot.release(job.submission.keepAliveMs ?? deps.defaultKeepAliveMs);
    }
  }
}

/**
 * Plans the job for this engine's GPU (where it is planned), loads the model unless the engine holds
 * it with the same plan, and generates; after an OOM, once more with a safer plan (policy.ts).
 */
async function generateWithOomRetry(job: StoredJob, slot: EngineSlot, partial: string, signal: AbortSignal, deps: RunJobDeps): Promise<GenerateResult> {
  const { submission, id } = job;
  const planFor = (margin?: number) => planOn(submission.model.name, submission.params, slot.gpus[0], slot.hello?.hostRamBytes ?? null, margin);
  let plan = planFor();
  for (let retries = 0; ; retries++) {
    if (plan !== null) deps.logger.info(`job ${id}: ${describePlan(plan)}`);
    const spec = modelSpecFor(submission, slot.gpus, deps.cacheDir, plan);
    const loaded = slot.loadedSpec;
    if (loaded === null || !sameLoad(loaded, spec)) {
      await deps.journal.note(id, { type: "model.loading", model: submission.model.name });
      // A load is not cancellable in the protocol: a cancel during it takes effect right after.
      await deps.exclusiveLoad(() => slot.load(spec, modelIdentity(submission)));
    }
    throwIfAborted(signal);
    const progress = new ProgressTracker();
    try {
      return await slot.generate(jobSpecFor(submission, partial, plan), {
        signal,
        onEvent: (event) => {
          const data = progress.toEvent(event);
          if (data !== null) void deps.journal.note(id, data).catch(() => {});
        },
      });
    } catch (err) {
      const error = toKinoError(err);
      if (error.code !== "OOM" || signal.aborted) throw err;
      const decision = decideOomRetry(retries, plan !== null);
      deps.logger.warn(`job ${id}: ${decision.reason} (${error.message})`);
      if (!decision.retry) throw err;
      await deps.journal.note(id, { type: "notice", message: decision.reason });
      if (plan !== null) plan = planFor(decision.margin);
    }
  }
}

function describePlan(p: Plan): string {
  const gib = (b: number) => `${(b / 2 ** 30).toFixed(1)} GiB`;
  const { textEncoder, transformer, vae } = p.placement;
  return (
    `plan on ${p.hardware}: text encoder ${describePlacement(textEncoder)}, transformer ${describePlacement(transformer)}, VAE ${describePlacement(vae)}, ` +
    `decode ${describeDecode(p.vaeDecode)}, CFG ${p.cfg}; predicted peak ${gib(p.predicted.peakVram)} of ${gib(p.budget.usableVram)} usable`
  );
}

async function settleFailure(id: string, error: KinoError, signal: AbortSignal, deps: RunJobDeps): Promise<void> {
  const now = deps.clock.now();
  if (signal.aborted && signal.reason === SHUTDOWN) {
    deps.logger.info(`job ${id}: requeued (the server is shutting down)`);
    await deps.journal.update(id, { status: "queued", startedAt: null }, { type: "notice", message: "requeued: the server shut down while the job ran; it runs again when the server is back" });
    return;
  }
  if (signal.aborted) {
    await deps.journal.update(id, { status: "cancelled", finishedAt: now }, { type: "cancelled", reason: "cancelled at the client's request" });
    return;
  }
  const info = errorInfo(error);
  deps.logger.warn(`job ${id} failed: ${info.code}: ${info.message}`);
  await deps.journal.update(id, { status: "failed", finishedAt: now, error: info }, { type: "failed", error: info });
}

/** What a client sees of a job's error: code, a message that says what happened to the job, and the request field. */
export function errorInfo(error: KinoError): ErrorInfo {
  let message = error.message;
  if (isEngineFailure(error.code) && error.code !== "ENGINE_UNAVAILABLE") {
    message = `the engine stopped while running this job (${error.message}); the job was not retried, and a fresh engine serves the next one`;
  } else if (error.hint !== undefined) {
    message = `${message} (${error.hint})`;
  }
  // The engine names fields of its protocol request ("job.frames"); clients know the request's.
  const field = error.field?.replace(/^(job|model)\./, "").replace(/^(width|height)$/, "size") ?? null;
  return { code: error.code, message, field };
}

function resultSummary(r: GenerateResult): JobResult {
  return {
    frames: r.frames,
    width: r.width,
    height: r.height,
    fps: r.fps,
    secondsPerStep: r.secondsPerStep,
    timings: r.timings,
    peakVramBytes: r.peakVramBytes,
    peakRamBytes: r.peakRamBytes,
  };
}

function throwIfAborted(signal: AbortSignal): void {
  if (signal.aborted) throw new KinoError("CANCELLED", "cancelled");
}
