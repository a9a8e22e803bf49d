/**
 * The job service: what every API does with jobs, whatever its wire format. The native routes
 * (routes/jobs.ts) and the OpenAI-compatible /v1/videos routes (openai/) call it: submit, look up,
 * list, cancel, delete, follow the events, find the video and the previews.
 */
import { randomUUID } from "node:crypto";
import { readFile, rm, stat } from "node:fs/promises";
import { listModels } from "../../api/models.ts";
import { KinoError, toKinoError } from "../../errors.ts";
import type { Scheduler } from "../scheduler/scheduler.ts";
import { TERMINAL_EVENTS, TERMINAL_STATUSES, type Job, type JobStatus, type PlanEstimate } from "../schemas.ts";
import { estimateJob } from "./estimate.ts";
import { jobFile, jobFolder, previewFile } from "./files.ts";
import type { JobJournal } from "./journal.ts";
import { prepareSubmission } from "./prepare.ts";
import type { StoredEvent, StoredJob } from "./store.ts";
import { jobView } from "./view.ts";

export interface JobServiceDeps {
  readonly journal: JobJournal;
  readonly scheduler: Scheduler;
  readonly modelsDir: string;
  readonly dataDir: string;
}

/** A subscription to a job's events, replayed then live; it ends itself after the terminal event. */
export interface EventFollow {
  /** Resolves when the stream is over: the terminal event was delivered, or `stop` was called. */
  readonly ended: Promise<void>;
  stop(): void;
}

export interface VideoFile {
  readonly path: string;
  readonly bytes: number;
  readonly contentType: string;
  /** A name for Content-Disposition. */
  readonly fileName: string;
}

export class JobService {
  readonly #deps: JobServiceDeps;

  constructor(deps: JobServiceDeps) {
    this.#deps = deps;
  }

  /**
   * Checks, admits and queues a job; answers it as stored (it may have started already).
   * @throws KinoError INVALID_ARGUMENT …, INFEASIBLE, QUEUE_FULL, NO_ENGINE, SERVER_CLOSING
   */
  async submit(body: unknown): Promise<Job> {
    const { scheduler, journal } = this.#deps;
    // Admission and "auto" need to know the engines' devices.
    await scheduler.whenReady();
    const submission = await prepareSubmission(body, scheduler.machine(), this.#deps.modelsDir);
    const reservation = scheduler.reserve();
    const id = randomUUID();
    let created: StoredJob;
    try {
      created = await journal.create(id, submission, { type: "queued", position: scheduler.queueLength + 1 });
    } catch (err) {
      reservation.release();
      throw err;
    }
    try {
      await reservation.commit(created);
    } catch (err) {
      // Stored but not queued (a shared queue refused it): it would never run, so it fails now.
      const error = { code: toKinoError(err).code, message: `the job could not be queued: ${toKinoError(err).message}`, field: null };
      await journal.update(id, { status: "failed", finishedAt: journal.now(), error }, { type: "failed", error }).catch(() => {});
      throw err;
    }
    return this.#view((await journal.store.get(id)) ?? created);
  }

  /**
   * The planner's estimate for a request, before it is submitted.
   * @throws KinoError INVALID_ARGUMENT …, UNKNOWN_MODEL, INFEASIBLE
   */
  async estimate(body: unknown): Promise<PlanEstimate> {
    await this.#deps.scheduler.whenReady();
    return estimateJob(body, this.#deps.scheduler.machine(), this.#deps.modelsDir);
  }

  /** @throws KinoError JOB_NOT_FOUND */
  async get(id: string): Promise<Job> {
    return this.#view(await this.#find(id));
  }

  /**
   * Newest first (or oldest first with order "asc"); `cursor` is the `nextCursor` of the previous
   * page, or `cursorOf` a job to start after it.
   */
  async list(query: { status?: JobStatus; limit: number; cursor?: string; order?: "asc" | "desc" }): Promise<{ jobs: Job[]; nextCursor: string | null }> {
    const cursor = query.cursor === undefined ? undefined : Number(query.cursor);
    const page = await this.#deps.journal.store.list({
      status: query.status,
      limit: query.limit,
      order: query.order,
      ...(query.order === "asc" ? { afterSeq: cursor } : { beforeSeq: cursor }),
    });
    return { jobs: page.jobs.map((j) => this.#view(j)), nextCursor: page.nextCursor === null ? null : String(page.nextCursor) };
  }

  /**
   * Cancels a job: a queued one at once; a running one between denoising steps (its `cancelled`
   * event follows; `cancelRequested` says it was asked).
   * @throws KinoError JOB_NOT_FOUND, JOB_FINISHED
   */
  async cancel(id: string): Promise<Job> {
    const { journal, scheduler } = this.#deps;
    const job = await this.#find(id);
    if (TERMINAL_STATUSES.includes(job.status)) {
      throw new KinoError("JOB_FINISHED", `job ${id} has already ${job.status === "cancelled" ? "been cancelled" : job.status}; there is nothing to cancel`, {
        field: "id",
      });
    }
    const outcome = await scheduler.cancel(id);
    if (outcome === "stopping") return this.#view(await journal.update(id, { cancelRequested: true }));
    return this.#view(await journal.cancelledBeforeStart(id));
  }

  /**
   * Deletes a job: its record, events and files. A job that has not ended is cancelled first, and
   * deleted once it has stopped (between denoising steps, or after a load in progress).
   * @throws KinoError JOB_NOT_FOUND
   */
  async delete(id: string): Promise<void> {
    const job = await this.#find(id);
    if (!TERMINAL_STATUSES.includes(job.status)) {
      const cancelled = await this.cancel(id).catch((err: unknown) => {
        // It ended meanwhile: nothing to stop.
        if (toKinoError(err).code !== "JOB_FINISHED") throw err;
      });
      if (cancelled !== undefined && !TERMINAL_STATUSES.includes(cancelled.status)) {
        const follow = await this.follow(id, 0, () => {});
        await follow.ended;
      }
    }
    await this.#deps.journal.store.remove(id);
    await rm(jobFolder(this.#deps.dataDir, id), { recursive: true, force: true });
  }

  /** A cursor for `list` that starts right after this job. @throws KinoError JOB_NOT_FOUND */
  async cursorOf(id: string): Promise<string> {
    return String((await this.#find(id)).seq);
  }

  /** The job's stored events, in order. @throws KinoError JOB_NOT_FOUND */
  async events(id: string): Promise<StoredEvent[]> {
    await this.#find(id);
    return this.#deps.journal.store.events(id, 0);
  }

  /**
   * Delivers the job's events after `afterSeq` (stored ones first, then live ones as they happen),
   * each once and in order, until the terminal event. Subscribes before replaying, so nothing that
   * happens during the replay is missed.
   * @throws KinoError JOB_NOT_FOUND
   */
  async follow(id: string, afterSeq: number, onEvent: (event: StoredEvent) => void): Promise<EventFollow> {
    const { journal } = this.#deps;
    await this.#find(id);
    let last = afterSeq;
    let live = false;
    let stopped = false;
    const early: StoredEvent[] = [];
    let resolveEnded!: () => void;
    const ended = new Promise<void>((resolve) => (resolveEnded = resolve));
    const stop = () => {
      if (stopped) return;
      stopped = true;
      unsubscribe();
      resolveEnded();
    };
    const deliver = (event: StoredEvent) => {
      if (stopped || event.seq <= last) return;
      last = event.seq;
      onEvent(event);
      if (TERMINAL_EVENTS.has(event.data.type)) stop();
    };
    const unsubscribe = journal.subscribe(id, (event) => (live ? deliver(event) : early.push(event)));
    try {
      for (const event of await journal.store.events(id, afterSeq)) deliver(event);
      live = true;
      for (const event of early) deliver(event);
      // Resumed after the terminal event: nothing more will come.
      const job = await journal.store.get(id);
      if (job !== undefined && TERMINAL_STATUSES.includes(job.status)) stop();
    } catch (err) {
      stop();
      throw err;
    }
    return { ended, stop };
  }

  /** @throws KinoError JOB_NOT_FOUND, VIDEO_NOT_AVAILABLE */
  async video(id: string): Promise<VideoFile> {
    const job = await this.#find(id);
    const artifact = job.artifacts.find((a) => a.kind === "video");
    if (artifact === undefined) {
      const why = job.status === "queued" || job.status === "running" ? `it is ${job.status}; follow its events until completed` : `it ${job.status === "cancelled" ? "was cancelled" : job.status}`;
      throw new KinoError("VIDEO_NOT_AVAILABLE", `job ${id} has no video: ${why}`, { field: "id" });
    }
    const path = jobFile(this.#deps.dataDir, id, artifact.file);
    const file = await stat(path).catch(() => null);
    if (file === null || !file.isFile()) throw new KinoError("VIDEO_NOT_AVAILABLE", `the video of job ${id} is no longer in the data folder`, { field: "id" });
    return { path, bytes: file.size, contentType: artifact.contentType, fileName: `${id}.mp4` };
  }

  /**
   * The PNG of the preview a job took at a denoising step (its `preview` events name them).
   * @throws KinoError JOB_NOT_FOUND, PREVIEW_NOT_FOUND
   */
  async preview(id: string, step: number): Promise<Buffer> {
    const job = await this.#find(id);
    const png = await readFile(previewFile(this.#deps.dataDir, id, step)).catch((err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT" || err.code === "ENOTDIR" || err.code === "EISDIR") return null;
      throw err;
    });
    if (png !== null) return png;
    const every = job.submission.previewEvery;
    const why =
      every === 0
        ? "it takes no previews (previewEvery 0)"
        : job.status === "queued" || job.status === "running"
          ? `none was taken there yet (it takes one every ${every} steps and at the last; follow its preview events)`
          : job.status === "completed"
            ? `none was taken there (it took one every ${every} steps and at the last; its preview events name them)`
            : `the previews of a job that ${job.status === "cancelled" ? "was cancelled" : "failed"} are not kept`;
    throw new KinoError("PREVIEW_NOT_FOUND", `job ${id} has no preview of step ${step}: ${why}`, { field: "step" });
  }

  /** The catalog, what is downloaded, and which engines hold each model. */
  async models() {
    const engines = this.#deps.scheduler.engines();
    const listed = await listModels({ modelsDir: this.#deps.modelsDir });
    return {
      models: listed.map((m) => ({
        id: m.id,
        description: m.description,
        origin: m.origin,
        present: m.present,
        randomWeights: m.randomWeights,
        loadedOn: engines.filter((e) => e.model === m.id).map((e) => e.engine),
      })),
    };
  }

  async #find(id: string): Promise<StoredJob> {
    const job = await this.#deps.journal.store.get(id);
    if (job === undefined) throw new KinoError("JOB_NOT_FOUND", `no job ${id}`, { field: "id" });
    return job;
  }

  #view(job: StoredJob): Job {
    return jobView(job, this.#deps.scheduler.queuePosition(job.id));
  }
}
