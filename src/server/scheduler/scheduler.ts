/**
 * The scheduler, after Ollama's (server/sched.go): one persistent engine per GPU (one in all on a CPU
 * machine), models loaded on demand and kept for a keep-alive, one load at a time, and a bounded
 * queue that answers at once when full. Jobs leave the queue in order, each to the engine that
 * `pickSlot` chooses; `runJob` takes it from there.
 *
 * Engines are discovered by starting one: if it sees several GPUs, it is replaced by one engine
 * pinned to each (CUDA_VISIBLE_DEVICES, through the factory's placement); otherwise it stays.
 */
import { KinoError, toKinoError } from "../../errors.ts";
import { LocalJobQueue, type JobQueue, type QueuedJob } from "../jobs/queue.ts";
import type { StoredJob } from "../jobs/store.ts";
import type { EngineStatus, Health } from "../schemas.ts";
import type { MachineFacts } from "./admission.ts";
import { batchKey, modelIdentity } from "./model-spec.ts";
import { pickSlot, selectBatch } from "./policy.ts";
import { runJob, SHUTDOWN, CANCEL, type RunJobDeps } from "./run-job.ts";
import { EngineSlot, type SlotEngineFactory } from "./slot.ts";

export interface SchedulerDeps extends Omit<RunJobDeps, "exclusiveLoad"> {
  readonly startEngine: SlotEngineFactory;
  /** Jobs waiting at most (running ones not counted). */
  readonly queueSize: number;
  /** @default a LocalJobQueue */
  readonly queue?: JobQueue;
}

interface Running {
  readonly controller: AbortController;
  readonly done: Promise<void>;
}

/** A place in the queue held while a submission is being stored; commit or release it. */
export interface Reservation {
  commit(job: StoredJob): void;
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
  readonly #runDeps: RunJobDeps;

  constructor(deps: SchedulerDeps) {
    this.#deps = deps;
    this.#queue = deps.queue ?? new LocalJobQueue();
    this.#runDeps = { ...deps, exclusiveLoad: (load) => this.#exclusiveLoad(load) };
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
    if (this.#queue.size + this.#reserved >= this.#deps.queueSize) {
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
      commit: (job) => {
        if (!close()) return;
        this.#queue.push(queueEntry(job));
        this.#dispatch();
      },
      release: () => void close(),
    };
  }

  /**
   * Cancels a job: a queued one leaves the queue ("dequeued": the caller records it); a running one
   * is stopped between steps and its runner records it ("stopping").
   */
  cancel(id: string): "dequeued" | "stopping" | "unknown" {
    if (this.#queue.remove(id)) return "dequeued";
    const running = this.#running.get(id);
    if (running === undefined) return "unknown";
    running.controller.abort(CANCEL);
    return "stopping";
  }

  /** Jobs waiting. */
  get queueLength(): number {
    return this.#queue.size;
  }

  queuePosition(id: string): number | null {
    return this.#queue.position(id);
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
      queue: { queued: this.#queue.size, running: this.#running.size, capacity: this.#deps.queueSize },
    };
  }

  /**
   * Stops: no more jobs start; running ones are stopped and put back in the queue (their runner
   * records it); engines are closed. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      for (const running of this.#running.values()) running.controller.abort(SHUTDOWN);
      // Closing the engines also ends a load (the protocol cannot cancel one) and a start in flight.
      const closeEngines = () => Promise.all(this.#slots.map((s) => s.close()));
      await closeEngines();
      // Discovery sees the close and starts nothing more; should it have replaced the slots first, close those too.
      await this.#ready?.catch(() => {});
      await closeEngines();
      await Promise.all([...this.#running.values()].map((r) => r.done));
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

  /** Starts queued jobs, in order, while an engine is free for the next one. */
  #dispatch(): void {
    if (this.#closing !== null) return;
    for (let next = this.#queue.peek(); next !== undefined; next = this.#queue.peek()) {
      const index = pickSlot(
        this.#slots.map((s) => s.view()),
        next.identity,
      );
      const slot = this.#slots.find((s) => s.index === index);
      if (slot === undefined) return;
      const batch = selectBatch(next, this.#queue.waiting());
      for (const job of batch) this.#queue.remove(job.id);
      this.#run(batch[0]!, slot);
    }
  }

  #run(entry: QueuedJob, slot: EngineSlot): void {
    slot.acquire(entry.id);
    const controller = new AbortController();
    const done = (async () => {
      const job = await this.#deps.journal.store.get(entry.id).catch((err: unknown) => {
        slot.release(this.#deps.defaultKeepAliveMs);
        throw err;
      });
      if (job === undefined || job.status !== "queued") {
        slot.release(this.#deps.defaultKeepAliveMs);
        return;
      }
      // runJob releases the slot itself, however the job ends.
      await runJob(job, slot, controller.signal, this.#runDeps);
    })()
      .catch((err: unknown) => this.#deps.logger.warn(`job ${entry.id}: ${toKinoError(err).message}`))
      .finally(() => {
        this.#running.delete(entry.id);
        this.#dispatch();
      });
    this.#running.set(entry.id, { controller, done });
  }

  #exclusiveLoad<T>(load: () => Promise<T>): Promise<T> {
    const run = this.#loads.then(load, load);
    this.#loads = run.catch(() => {});
    return run;
  }
}

function queueEntry(job: StoredJob): QueuedJob {
  return { id: job.id, identity: modelIdentity(job.submission), batchKey: batchKey(job.submission) };
}
