/**
 * The scheduler, after Ollama's (server/sched.go): one persistent engine per GPU (one in all on a CPU
 * machine), models loaded on demand and kept for a keep-alive, one load at a time, and a bounded
 * queue that answers at once when full. Jobs leave the queue in order, each to the engine that
 * `pickSlot` chooses, together with the waiting jobs of its model and shape that the engine's plan
 * has room for (a batch: one denoising loop for all of them, `--max-batch` at most); `runJobs` takes
 * them from there.
 *
 * Engines are discovered by starting one: if it sees several GPUs, it is replaced by one engine
 * pinned to each (CUDA_VISIBLE_DEVICES, through the factory's placement); otherwise it stays.
 *
 * With a shared queue (several nodes on Redis, jobs/shared-queue.ts), submissions go to the shared
 * queue instead of the local one; the node takes a job from it when it has an engine free, puts it
 * in its local queue (where it starts at once) and tells the shared queue when it is done with it.
 */
import { KinoError, toKinoError } from "../../errors.ts";
import { LocalJobQueue, type JobQueue, type QueuedJob } from "../jobs/queue.ts";
import { applyRecovery } from "../jobs/recovery.ts";
import type { SharedQueue, TakeOutcome } from "../jobs/shared-queue.ts";
import type { JobSubmission, StoredJob } from "../jobs/store.ts";
import type { EngineStatus, Health } from "../schemas.ts";
import { batchRoom, type MachineFacts } from "./admission.ts";
import { batchKey, modelIdentity } from "./model-spec.ts";
import { pickSlot, selectBatch } from "./policy.ts";
import { prewarmOn, runJobs, SHUTDOWN, CANCEL, type RunJobDeps } from "./run-job.ts";
import { EngineSlot, type SlotEngineFactory } from "./slot.ts";

export interface SchedulerDeps extends Omit<RunJobDeps, "exclusiveLoad"> {
  readonly startEngine: SlotEngineFactory;
  /** Jobs waiting at most (running ones not counted). */
  readonly queueSize: number;
  /** Jobs of one shape run as one batch at most (as the engine's plan has room); 1: each alone. */
  readonly maxBatch: number;
  /**
   * How long a job that just arrived waits on an idle engine for others of its shape to batch with
   * (`--batch-window`): without it, requests sent together would start one by one, the first alone.
   * 0: never waits. @default 0
   */
  readonly batchWindowMs?: number;
  /** @default a LocalJobQueue */
  readonly queue?: JobQueue;
  /** A queue shared with other nodes; submissions wait there. @default none: this node's queue only */
  readonly shared?: SharedQueue;
}

interface Running {
  readonly controller: AbortController;
  readonly done: Promise<void>;
}

/** A place in the queue held while a submission is being stored; commit or release it. */
export interface Reservation {
  /** Queues the stored job; resolves once it is queued (in a shared queue: durably). */
  commit(job: StoredJob): Promise<void>;
  release(): void;
}

/** How long /api/health waits for an idle engine to answer. */
const PROBE_TIMEOUT_MS = 2000;

export class Scheduler {
  readonly #deps: SchedulerDeps;
  readonly #queue: JobQueue;
  #slots: EngineSlot[] = [];
  #reserved = 0;
  readonly #running = new Map<string, Running>();
  #ready: Promise<void> | null = null;
  #closing: Promise<void> | null = null;
  #loads: Promise<unknown> = Promise.resolve();
  /** The batch window's pending re-dispatch, if one is armed. */
  #window: { at: number; cancel: () => void } | null = null;
  readonly #runDeps: RunJobDeps;
  /** Jobs taken from the shared queue and not yet given back, with what ends the take. */
  readonly #taken = new Map<string, (outcome: TakeOutcome) => void>();
  /** Taken jobs a cancellation reached before they were in the local queue. */
  readonly #cancelledTakes = new Set<string>();

  constructor(deps: SchedulerDeps) {
    this.#deps = deps;
    this.#queue = deps.queue ?? new LocalJobQueue();
    this.#runDeps = { ...deps, exclusiveLoad: (load) => this.#exclusiveLoad(load) };
    deps.shared?.onCancel((id) => void this.#cancelBroadcast(id));
  }

  /**
   * Queues the jobs stored as queued (oldest first) and starts the engines. Resolves once the first
   * engine answered or failed; later engines and restarts go on in the background.
   */
  start(queued: readonly StoredJob[]): Promise<void> {
    for (const job of queued) this.#queue.push(queueEntry(job));
    this.#ready ??= this.#discover();
    return this.#ready;
  }

  /** Resolves once the engines were discovered (see start). */
  whenReady(): Promise<void> {
    return this.#ready ?? Promise.resolve();
  }

  /** What admission plans against: the engines' GPUs and host memory. */
  machine(): MachineFacts {
    const gpus = this.#slots.flatMap((s) => s.gpus);
    const hostRamBytes = this.#slots.find((s) => s.hello !== null)?.hello?.hostRamBytes ?? null;
    return { gpus, hostRamBytes };
  }

  /**
   * Holds a place in the queue, synchronously, so concurrent submissions cannot overfill it.
   * @throws KinoError SERVER_CLOSING, NO_ENGINE, QUEUE_FULL
   */
  reserve(): Reservation {
    if (this.#closing !== null) throw new KinoError("SERVER_CLOSING", "the server is shutting down and takes no new jobs");
    if (this.#slots.length > 0 && this.#slots.every((s) => s.state === "failed" || s.state === "closed")) {
      const why = this.#slots.map((s) => s.status().error).find((e) => e !== null);
      throw new KinoError("NO_ENGINE", `no engine can run jobs: ${why ?? "none started"}`);
    }
    if (this.queueLength + this.#reserved >= this.#deps.queueSize) {
      throw new KinoError("QUEUE_FULL", `the queue is full (${this.#deps.queueSize} jobs waiting)`);
    }
    this.#reserved++;
    let open = true;
    const close = () => {
      if (!open) return false;
      open = false;
      this.#reserved--;
      return true;
    };
    return {
      commit: async (job) => {
        if (!close()) return;
        if (this.#deps.shared !== undefined) return this.#deps.shared.add(job.id);
        this.#queue.push(queueEntry(job));
        this.#dispatch();
      },
      release: () => void close(),
    };
  }

  /**
   * Warms every idle engine for the submission's model and shape before jobs need it (`kino serve
   * --prewarm`): the slot is taken as for a job, the model loaded with the plan that shape's jobs get
   * (run-job.ts prewarmOn), and one forward run per batch size a batch of that shape may have there
   * (1 … what `batchRoom` allows under --max-batch when engines compile, since each size compiles on
   * its own; 1 otherwise). The model then stays loaded until a job's keep-alive says otherwise. An
   * engine busy with jobs is left alone; a failure is logged and leaves the engine to the jobs.
   * Resolves when every engine is done.
   */
  async prewarm(submission: JobSubmission): Promise<void> {
    const { model, params } = submission;
    const what = `${model.name} ${params.width}x${params.height}x${params.frames}`;
    await Promise.all(
      this.#slots.map(async (slot) => {
        if (this.#closing !== null || slot.state !== "idle" && slot.state !== "ready") {
          this.#deps.logger.info(`engine ${slot.index}: prewarm of ${what} skipped (it is ${slot.state})`);
          return;
        }
        const room = this.#deps.compile ? batchRoom(model.name, params, slot.gpus[0], slot.hello?.hostRamBytes ?? null, this.#deps.maxBatch) : 1;
        const batches = Array.from({ length: Math.max(1, room) }, (_, k) => k + 1);
        slot.acquire([]);
        try {
          const ms = await prewarmOn(submission, slot, batches, this.#runDeps);
          this.#deps.logger.info(`engine ${slot.index}: prewarmed ${what} (${batches.map((j, k) => `${j} job${j > 1 ? "s" : ""} ${(ms[k]! / 1000).toFixed(1)} s`).join(", ")})`);
        } catch (err) {
          this.#deps.logger.warn(`engine ${slot.index}: prewarm of ${what} failed: ${toKinoError(err).message}`);
        } finally {
          slot.release(-1);
        }
      }),
    );
  }

  /**
   * Cancels a job: a queued one leaves the queue ("dequeued": the caller records it); a running one
   * is stopped between steps and its runner records it ("stopping"), on whichever node runs it.
   */
  async cancel(id: string): Promise<"dequeued" | "stopping" | "unknown"> {
    const here = this.#cancelHere(id);
    const shared = this.#deps.shared;
    if (here !== "unknown" || shared === undefined) return here;
    const where = await shared.withdraw(id);
    if (where === "removed") return "dequeued";
    if (where === "absent") return "unknown";
    // A node holds it (this one, between taking it and queueing it, included).
    await shared.broadcastCancel(id);
    return "stopping";
  }

  /** Jobs waiting (in a shared queue: every node's, as last counted). */
  get queueLength(): number {
    return this.#queue.size + (this.#deps.shared?.size ?? 0);
  }

  queuePosition(id: string): number | null {
    return this.#queue.position(id) ?? this.#deps.shared?.position(id) ?? null;
  }

  engines(): EngineStatus[] {
    return this.#slots.map((s) => s.status());
  }

  /** The engines as they are: idle ones are asked to answer first, so one that died is noticed (and replaced). */
  async health(): Promise<Health> {
    await Promise.all(this.#slots.map((s) => s.probe(PROBE_TIMEOUT_MS)));
    const engines = this.#slots.map((s) => ({ engine: s.index, state: s.state, error: s.status().error }));
    const usable = engines.filter((e) => e.state !== "failed" && e.state !== "closed").length;
    const failed = engines.length - usable;
    return {
      status: usable === 0 ? "unavailable" : failed > 0 ? "degraded" : "ok",
      engines,
      queue: { queued: this.queueLength, running: this.#running.size, capacity: this.#deps.queueSize },
    };
  }

  /**
   * Stops: no more jobs start; running ones are stopped and put back in the queue (their runner
   * records it); engines are closed. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#window?.cancel();
      this.#window = null;
      // No more jobs taken from a shared queue; those held are given back below.
      const sharedClosed = this.#deps.shared?.close();
      for (const running of this.#running.values()) running.controller.abort(SHUTDOWN);
      // Closing the engines also ends a load (the protocol cannot cancel one) and a start in flight.
      const closeEngines = () => Promise.all(this.#slots.map((s) => s.close()));
      await closeEngines();
      // Discovery sees the close and starts nothing more; should it have replaced the slots first, close those too.
      await this.#ready?.catch(() => {});
      await closeEngines();
      await Promise.all([...this.#running.values()].map((r) => r.done));
      // Taken but not started: back to the shared queue for another node.
      for (const give of this.#taken.values()) give("requeue");
      await sharedClosed;
    })();
    return this.#closing;
  }

  async #discover(): Promise<void> {
    const probe = this.#newSlot(0, null);
    this.#slots = [probe];
    await probe.start();
    const gpus = probe.gpus;
    if (gpus.length > 1 && this.#closing === null) {
      this.#deps.logger.info(`the engine sees ${gpus.length} GPUs: one engine per GPU`);
      await probe.close();
      this.#slots = gpus.map((g, i) => this.#newSlot(i, g.index));
      await Promise.all(this.#slots.map((s) => s.start()));
    }
    if (this.#closing === null) this.#deps.shared?.consume((id) => this.#take(id), this.#slots.length);
    this.#dispatch();
  }

  #newSlot(index: number, gpu: number | null): EngineSlot {
    return new EngineSlot(index, gpu, {
      startEngine: this.#deps.startEngine,
      clock: this.#deps.clock,
      logger: this.#deps.logger,
      onChange: () => this.#dispatch(),
    });
  }

  /** Starts queued jobs, in order, while an engine is free for the next one (with its batch). */
  #dispatch(): void {
    if (this.#closing !== null) return;
    for (let next = this.#queue.peek(); next !== undefined; next = this.#queue.peek()) {
      const index = pickSlot(
        this.#slots.map((s) => s.view()),
        next.identity,
      );
      const slot = this.#slots.find((s) => s.index === index);
      if (slot === undefined) return;
      const { model, params } = next.submission;
      // How many jobs of this shape the engine's plan has room for (batchRoom(n) is min(n, that)).
      const room = batchRoom(model.name, params, slot.gpus[0], slot.hello?.hostRamBytes ?? null, this.#deps.maxBatch);
      const batch = selectBatch(next, this.#queue.waiting(), room);
      const wait = this.#batchWait(next, batch.length, room);
      if (wait > 0) {
        // The next job is young and its batch has room: give its shape's other requests a moment.
        this.#armWindow(wait);
        return;
      }
      for (const job of batch) this.#queue.remove(job.id);
      this.#run(batch, slot);
    }
  }

  /**
   * How long the next job should still wait for company (ms; 0: start now): only a job younger than
   * the batch window, whose batch is not full yet and could hold more on this engine, on a node whose
   * queue is its own (a shared queue hands a node one job per free engine, so no company would come).
   */
  #batchWait(next: QueuedJob, batchSize: number, room: number): number {
    const window = this.#deps.batchWindowMs ?? 0;
    if (window <= 0 || batchSize >= room || this.#deps.shared !== undefined || next.createdAt === undefined) return 0;
    return Math.max(0, next.createdAt + window - this.#deps.clock.now());
  }

  /** Dispatches again after `ms` (the earliest of the windows asked for). */
  #armWindow(ms: number): void {
    const at = this.#deps.clock.now() + ms;
    if (this.#window !== null && this.#window.at <= at) return;
    this.#window?.cancel();
    const cancel = this.#deps.clock.setTimer(ms, () => {
      this.#window = null;
      this.#dispatch();
    });
    this.#window = { at, cancel };
  }

  /** Runs a job, or the jobs of a batch, on the slot; each job can be cancelled on its own. */
  #run(entries: readonly QueuedJob[], slot: EngineSlot): void {
    const ids = entries.map((e) => e.id);
    slot.acquire(ids);
    const controllers = entries.map(() => new AbortController());
    const done = (async () => {
      const jobs = await Promise.all(ids.map((id) => this.#deps.journal.store.get(id))).catch((err: unknown) => {
        slot.release(this.#deps.defaultKeepAliveMs);
        throw err;
      });
      // A job may have left the queued state meanwhile (cancelled, deleted): it does not run.
      const runnable = jobs.flatMap((job, k) => (job?.status === "queued" ? [{ job, signal: controllers[k]!.signal }] : []));
      if (runnable.length === 0) {
        slot.release(this.#deps.defaultKeepAliveMs);
        return;
      }
      // runJobs releases the slot itself, however the jobs end.
      await runJobs(runnable.map((r) => r.job), slot, runnable.map((r) => r.signal), this.#runDeps);
    })()
      .catch((err: unknown) => this.#deps.logger.warn(`job ${ids.join(", ")}: ${toKinoError(err).message}`))
      .then(async () => void (await Promise.all(ids.map((id) => this.#giveBack(id)))))
      .finally(() => {
        for (const id of ids) this.#running.delete(id);
        this.#dispatch();
      });
    entries.forEach((e, k) => this.#running.set(e.id, { controller: controllers[k]!, done }));
  }

  /** Stops a job if it is here: out of the local queue, or aborted while it runs. */
  #cancelHere(id: string): "dequeued" | "stopping" | "unknown" {
    if (this.#queue.remove(id)) {
      this.#taken.get(id)?.("done");
      return "dequeued";
    }
    const running = this.#running.get(id);
    if (running === undefined) return "unknown";
    running.controller.abort(CANCEL);
    return "stopping";
  }

  /** A cancellation broadcast by some node, for a job this node may hold. */
  async #cancelBroadcast(id: string): Promise<void> {
    const here = this.#cancelHere(id);
    if (here === "dequeued") {
      await this.#deps.journal.cancelledBeforeStart(id).catch((err: unknown) => this.#deps.logger.warn(`job ${id}: ${toKinoError(err).message}`));
    } else if (here === "unknown" && this.#taken.has(id)) {
      this.#cancelledTakes.add(id);
    }
  }

  /**
   * Takes a job from the shared queue: runs it here, and resolves once this node is done with it.
   * A job found running was held by a node that died (the shared queue's lock expired): recovery
   * decides whether it runs again.
   */
  async #take(id: string): Promise<TakeOutcome> {
    if (this.#closing !== null) return "requeue";
    const { journal } = this.#deps;
    const done = new Promise<TakeOutcome>((resolve) => this.#taken.set(id, resolve));
    try {
      let job = await journal.store.get(id);
      if (job?.status === "running") job = await applyRecovery(journal, job);
      if (job === undefined || job.status !== "queued") return "done";
      if (job.cancelRequested || this.#cancelledTakes.has(id)) {
        await journal.cancelledBeforeStart(id);
        return "done";
      }
      if (this.#closing !== null) return "requeue";
      this.#queue.push(queueEntry(job));
      this.#dispatch();
      return await done;
    } finally {
      this.#taken.delete(id);
      this.#cancelledTakes.delete(id);
    }
  }

  /** After a taken job's run: requeued (the node shuts down) goes back to the shared queue. */
  async #giveBack(id: string): Promise<void> {
    const give = this.#taken.get(id);
    if (give === undefined) return;
    const job = await this.#deps.journal.store.get(id).catch(() => undefined);
    give(job?.status === "queued" ? "requeue" : "done");
  }

  #exclusiveLoad<T>(load: () => Promise<T>): Promise<T> {
    const run = this.#loads.then(load, load);
    this.#loads = run.catch(() => {});
    return run;
  }
}

function queueEntry(job: StoredJob): QueuedJob {
  return { id: job.id, identity: modelIdentity(job.submission), batchKey: batchKey(job.submission), submission: job.submission, createdAt: job.createdAt };
}
