/**
 * Runs one job, or the jobs of a batch, on one engine slot, from "started" to each job's terminal
 * event: make the tiny model if needed, plan for the engine's GPU, load the model unless the engine
 * holds it with that plan, generate into a temporary file in each job's folder, rename it into place,
 * record the artifact and the result; on the way, its progress and previews (previews.ts) as events.
 * How each job ends:
 *
 * - completed: the video is at <dataDir>/jobs/<id>/video.mp4;
 * - cancelled: the client asked (the engine stops between steps);
 * - back to queued: the server is shutting down (graceful shutdown requeues, see recovery.ts);
 * - failed: anything else, with the error's code, message and field; an OOM is retried once first,
 *   with a safer plan where the job is planned (a job that ran out of memory in a batch runs again
 *   alone first); an engine that died (crash, SIGKILL, stall) fails its jobs and is replaced for the
 *   next ones.
 */
import { randomUUID } from "node:crypto";
import { mkdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { KinoError, toKinoError } from "../../errors.ts";
import type { Logger } from "../../log.ts";
import type { EngineEvent, GenerateResult } from "../../protocol/engine.ts";
import type { Clock } from "../clock.ts";
import { jobFile, jobFolder } from "../jobs/files.ts";
import type { JobJournal } from "../jobs/journal.ts";
import type { JobSubmission, StoredArtifact, StoredJob } from "../jobs/store.ts";
import { artifactView } from "../jobs/view.ts";
import type { ErrorInfo, JobResult } from "../schemas.ts";
import { describeDecode, describePlacement, type Plan } from "../../planner/plan.ts";
import { learnedPeaks } from "../../planner/learn.ts";
import { planOn } from "./admission.ts";
import { jobSpecFor, modelIdentity, modelSpecFor, sameLoad } from "./model-spec.ts";
import { batchKeepAlive, batchOomRetryReason, decideOomRetry, isEngineFailure } from "./policy.ts";
import { PreviewRecorder } from "./previews.ts";
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
  /** Engines compile their transformer blocks (`kino serve --compile`). @default false */
  readonly compile?: boolean;
}

/** A job of a run, with what ends it, where its video is written first, and its previews. */
interface Member {
  readonly job: StoredJob;
  readonly signal: AbortSignal;
  readonly partial: string;
  readonly previews: PreviewRecorder;
}

/** Runs the job to its end; never rejects (every outcome is recorded on the job). */
export function runJob(job: StoredJob, slot: EngineSlot, signal: AbortSignal, deps: RunJobDeps): Promise<void> {
  return runJobs([job], slot, [signal], deps);
}

/**
 * Runs jobs of one shape (equal `batchKey`s) on one engine slot: one alone, several as one batch (one
 * plan, one load, one denoising loop), each with its own events, video and outcome, recorded as soon
 * as it ends. Never rejects. The slot is released (or replaced, if its engine died) once all ended.
 */
export async function runJobs(jobs: readonly StoredJob[], slot: EngineSlot, signals: readonly AbortSignal[], deps: RunJobDeps): Promise<void> {
  const members = jobs.map((job, k): Member => ({
    job,
    signal: signals[k]!,
    partial: join(jobFolder(deps.dataDir, job.id), `.video-${job.attempts + 1}.partial.mp4`),
    previews: new PreviewRecorder(job.id, deps),
  }));
  let outcomes: Promise<GenerateResult>[];
  try {
    await start(members, slot, deps);
    outcomes = members.length === 1 ? [generateWithOomRetry(members[0]!, slot, deps)] : await generateTogether(members, slot, deps);
  } catch (err) {
    // Before the jobs went their own ways (the engine, the tiny model, the plan, the load): all end with it.
    outcomes = members.map(() => Promise.reject(err));
  }
  const died = await Promise.all(members.map((m, k) => finish(m, outcomes[k]!, deps)));
  if (died.some((d) => d)) {
    void slot.replaceAfterFailure(`it died during job ${jobs.map((j) => j.id).join(", ")}`);
  } else {
    slot.release(batchKeepAlive(jobs.map((j) => j.submission.keepAliveMs ?? deps.defaultKeepAliveMs)));
  }
}

/** Records the jobs as started, checks the engine, makes the tiny model where needed, makes their folders. */
async function start(members: readonly Member[], slot: EngineSlot, deps: RunJobDeps): Promise<void> {
  for (const { job } of members) {
    const attempt = job.attempts + 1;
    await deps.journal.update(job.id, { status: "running", startedAt: deps.clock.now(), attempts: attempt }, { type: "started", attempt, engine: slot.index });
    if (members.length > 1) {
      const others = members.length - 1;
      const message = `runs in one batch with ${others} other job${others === 1 ? "" : "s"} of the same model and shape: one denoising loop for all of them`;
      await deps.journal.note(job.id, { type: "notice", message });
    }
  }
  // A batch shares its model.
  await prepareEngine(members[0]!.job.submission, slot, deps, async (message) => {
    for (const { job } of members) await deps.journal.note(job.id, { type: "notice", message });
  });
  for (const { job } of members) await mkdir(jobFolder(deps.dataDir, job.id), { recursive: true });
}

/** Checks the engine answers and makes kino's tiny model where the submission needs it (`notify` says so first). */
async function prepareEngine(submission: JobSubmission, slot: EngineSlot, deps: RunJobDeps, notify: (message: string) => Promise<void>): Promise<void> {
  await slot.ensureAlive();
  if (submission.model.tiny && submission.model.path !== null && !(await hasCheckpoint(submission.model.path))) {
    await notify(`making kino's tiny model in ${submission.model.path} (once; a few seconds)`);
    await ensureTinyModel(submission.model.path, deps.makeTiny);
  }
}

/** Records how a job ended: its video and result, or its failure; says whether its engine died. */
async function finish(m: Member, outcome: Promise<GenerateResult>, deps: RunJobDeps): Promise<boolean> {
  const { journal } = deps;
  const id = m.job.id;
  // Its previews before its end: the last preview event precedes the terminal one, and no write is
  // left in flight to recreate the folder removed below.
  await outcome.catch(() => {});
  await m.previews.close();
  try {
    const result = await outcome;
    const video = jobFile(deps.dataDir, id, VIDEO_FILE);
    await rename(m.partial, video);
    const artifact: StoredArtifact = { id: randomUUID(), kind: "video", file: VIDEO_FILE, contentType: "video/mp4", bytes: (await stat(video)).size };
    await journal.update(id, { addArtifact: artifact }, { type: "output", artifact: artifactView(id, artifact) });
    const summary = resultSummary(result);
    await journal.update(id, { status: "completed", finishedAt: deps.clock.now(), result: summary }, { type: "completed", result: summary });
    return false;
  } catch (err) {
    // Nothing of a job that did not complete is kept (the engine's own temporary files included).
    await rm(jobFolder(deps.dataDir, id), { recursive: true, force: true }).catch(() => {});
    const error = toKinoError(err);
    await settleFailure(id, error, m.signal, deps).catch((e: unknown) => deps.logger.warn(`job ${id}: could not record how it ended: ${toKinoError(e).message}`));
    return isEngineFailure(error.code) && !m.signal.aborted;
  }
}

/** Loads the model with the plan unless the engine holds it with that plan already. */
async function ensureLoaded(members: readonly Member[], slot: EngineSlot, plan: Plan | null, deps: RunJobDeps): Promise<void> {
  const submission = members[0]!.job.submission;
  const ids = members.map((m) => m.job.id).join(", ");
  if (plan !== null) deps.logger.info(`job ${ids}: ${describePlan(plan)}`);
  await loadUnlessHeld(submission, slot, plan, deps, async () => {
    for (const { job } of members) await deps.journal.note(job.id, { type: "model.loading", model: submission.model.name });
  });
}

/** Loads the submission's model with the plan unless the engine holds it so already (`onLoading` first). */
async function loadUnlessHeld(submission: JobSubmission, slot: EngineSlot, plan: Plan | null, deps: RunJobDeps, onLoading: () => Promise<void>): Promise<void> {
  const spec = modelSpecFor(submission, slot.gpus, deps.cacheDir, plan, deps.compile ?? false);
  const loaded = slot.loadedSpec;
  if (loaded !== null && sameLoad(loaded, spec)) return;
  await onLoading();
  // A load is not cancellable in the protocol: a cancel during it takes effect right after.
  await deps.exclusiveLoad(() => slot.load(spec, modelIdentity(submission)));
}

/** The job's engine events as its progress events, and its previews (written, then announced). */
function progressOf(m: Member, deps: RunJobDeps): (event: EngineEvent) => void {
  const progress = new ProgressTracker();
  return (event) => {
    if (event.kind === "preview") return m.previews.add(event);
    const data = progress.toEvent(event);
    if (data !== null) void deps.journal.note(m.job.id, data).catch(() => {});
  };
}

function planFor(submission: StoredJob["submission"], slot: EngineSlot, margin?: number): Plan | null {
  return planOn(submission.model.name, submission.params, slot.gpus[0], slot.hello?.hostRamBytes ?? null, margin);
}

/**
 * Plans the job for this engine's GPU (where it is planned), loads the model unless the engine holds
 * it with the same plan, and generates; after an OOM, once more with a safer plan (policy.ts).
 */
async function generateWithOomRetry(m: Member, slot: EngineSlot, deps: RunJobDeps): Promise<GenerateResult> {
  const { submission, id } = m.job;
  let plan = planFor(submission, slot);
  for (let retries = 0; ; retries++) {
    await ensureLoaded([m], slot, plan, deps);
    throwIfAborted(m.signal);
    try {
      const result = await slot.generate(jobSpecFor(submission, m.partial, plan), { signal: m.signal, onEvent: progressOf(m, deps) });
      if (plan !== null && result.phasePeakVramBytes != null) {
        // A job run alone measured its plan's peaks: they correct the next plans (planner/learn.ts).
        await learnedPeaks.record(plan, result.phasePeakVramBytes).catch((e: Error) => deps.logger.warn(`job ${id}: could not record the measured peaks: ${e.message}`));
      }
      return result;
    } catch (err) {
      const error = toKinoError(err);
      if (error.code !== "OOM" || m.signal.aborted) throw err;
      const decision = decideOomRetry(retries, plan !== null);
      deps.logger.warn(`job ${id}: ${decision.reason} (${error.message})`);
      if (!decision.retry) throw err;
      await deps.journal.note(id, { type: "notice", message: decision.reason });
      if (plan !== null) plan = planFor(submission, slot, decision.margin);
    }
  }
}

/**
 * Runs the jobs as one batch: one plan (they share a shape, so a plan), one load, one denoising loop
 * (EngineSlot.generateBatch); one answer per job, as each ends. A job that ran out of device memory
 * in the batch runs again alone once the batch is over (one after another), with the OOM policy of a
 * job alone.
 */
async function generateTogether(members: readonly Member[], slot: EngineSlot, deps: RunJobDeps): Promise<Promise<GenerateResult>[]> {
  const plan = planFor(members[0]!.job.submission, slot);
  await ensureLoaded(members, slot, plan, deps);
  const answers = slot.generateBatch(
    members.map((m) => ({ job: jobSpecFor(m.job.submission, m.partial, plan), signal: m.signal, onEvent: progressOf(m, deps) })),
  );
  let alone: Promise<unknown> = Promise.allSettled(answers);
  return answers.map((answer, k) =>
    answer.catch((err: unknown) => {
      const m = members[k]!;
      if (toKinoError(err).code !== "OOM" || m.signal.aborted) throw err;
      const reason = batchOomRetryReason(members.length);
      const run = alone.then(async () => {
        deps.logger.warn(`job ${m.job.id}: ${reason} (${toKinoError(err).message})`);
        await deps.journal.note(m.job.id, { type: "notice", message: reason });
        return generateWithOomRetry(m, slot, deps);
      });
      alone = run.catch(() => {});
      return run;
    }),
  );
}

/**
 * Has the slot (acquired by the caller) hold the submission's model, loaded with the plan a job of
 * its shape gets on this engine (so that job finds it loaded), and runs one forward at that shape for
 * each batch size in `batches` (EngineSlot.prewarm). Returns each forward's ms.
 */
export async function prewarmOn(submission: JobSubmission, slot: EngineSlot, batches: readonly number[], deps: RunJobDeps): Promise<number[]> {
  const quiet = async () => {};
  await prepareEngine(submission, slot, deps, quiet);
  const plan = planFor(submission, slot);
  await loadUnlessHeld(submission, slot, plan, deps, quiet);
  const job = jobSpecFor(submission, null, plan); // a prewarm writes nothing
  const ms: number[] = [];
  for (const jobs of batches) ms.push((await slot.prewarm(job, jobs)).ms);
  return ms;
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
    batchSize: r.batchSize ?? 1,
  };
}

function throwIfAborted(signal: AbortSignal): void {
  if (signal.aborted) throw new KinoError("CANCELLED", "cancelled");
}
