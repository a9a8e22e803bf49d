/**
 * One engine slot: the persistent engine of one GPU (or the CPU), the model it holds, its keep-alive,
 * and its replacement when it dies. A slot never throws from start: an engine that cannot start
 * leaves the slot "failed" (health says why) and is tried again after a backoff.
 *
 * The protocol has no `unload`, and `load` replaces the loaded model, so switching models is a load;
 * unloading (keep-alive expiry) replaces the engine process with a fresh one, which frees everything.
 */
import type { BatchJobOptions, EngineClient } from "../../engine/client.ts";
import { KinoError, toKinoError } from "../../errors.ts";
import type { Logger } from "../../log.ts";
import type { DeviceInfo, EngineEvent, GenerateResult, HelloResult, JobSpec, LoadResult, ModelSpec, PrewarmResult } from "../../protocol/engine.ts";
import type { Clock } from "../clock.ts";
import type { EngineState, EngineStatus } from "../schemas.ts";
import { isEngineFailure, restartBackoffMs, type SlotView } from "./policy.ts";

/** Where an engine runs: its slot number and the GPU it is pinned to. */
export interface EnginePlacement {
  readonly engine: number;
  /** The GPU index to pin the engine to (CUDA_VISIBLE_DEVICES); null: unpinned (the CPU, or a single GPU). */
  readonly gpu: number | null;
}

/** Starts an engine for a placement. A plain `EngineFactory` (which ignores it) fits too. */
export type SlotEngineFactory = (placement: EnginePlacement) => Promise<EngineClient>;

export interface SlotDeps {
  readonly startEngine: SlotEngineFactory;
  readonly clock: Clock;
  readonly logger: Logger;
  /** Called whenever the slot may have become free (the scheduler dispatches then). */
  readonly onChange: () => void;
}

type Life = "starting" | "up" | "failed" | "closed";
type Activity = "idle" | "loading" | "busy";

export class EngineSlot {
  readonly index: number;
  readonly gpu: number | null;
  readonly #deps: SlotDeps;
  #life: Life = "starting";
  #activity: Activity = "idle";
  #engine: EngineClient | null = null;
  #hello: HelloResult | null = null;
  #loaded: { readonly identity: string; readonly spec: ModelSpec } | null = null;
  /** The jobs it runs: one, or the jobs of a batch. */
  #jobIds: readonly string[] = [];
  #weightBytes: number | null = null;
  #peakBytes: number | null = null;
  /** Device memory the running job held at its last denoising step (the engine's step events); null when idle. */
  #liveBytes: number | null = null;
  #expiresAt: number | null = null;
  /** The pending keep-alive expiry or restart backoff. */
  #cancelTimer: (() => void) | null = null;
  #failures = 0;
  #restarts = 0;
  #error: string | null = null;
  #starting: Promise<void> | null = null;

  constructor(index: number, gpu: number | null, deps: SlotDeps) {
    this.index = index;
    this.gpu = gpu;
    this.#deps = deps;
  }

  get state(): EngineState {
    if (this.#life !== "up") return this.#life;
    if (this.#activity !== "idle") return this.#activity;
    return this.#loaded === null ? "idle" : "ready";
  }

  /** The GPUs this slot's engine sees (one when pinned; none on the CPU or before it started). */
  get gpus(): readonly DeviceInfo[] {
    return this.#hello?.devices ?? [];
  }

  get hello(): HelloResult | null {
    return this.#hello;
  }

  get loadedIdentity(): string | null {
    return this.#loaded?.identity ?? null;
  }

  /** What the engine loaded last (its memory plan included); null when nothing is loaded. */
  get loadedSpec(): ModelSpec | null {
    return this.#loaded?.spec ?? null;
  }

  view(): SlotView {
    return { index: this.index, free: this.#life === "up" && this.#activity === "idle", loaded: this.loadedIdentity, expiresAt: this.#expiresAt };
  }

  status(): EngineStatus {
    const gpu = this.gpus[0];
    return {
      engine: this.index,
      state: this.state,
      device:
        this.#hello === null ? null : gpu === undefined ? { kind: "cpu", name: "cpu", totalBytes: null } : { kind: "cuda", name: gpu.name, totalBytes: gpu.totalBytes },
      model: this.#loaded?.spec.name ?? null,
      jobId: this.#jobIds[0] ?? null,
      jobIds: [...this.#jobIds],
      vramBytes: this.#loaded === null ? null : this.#weightBytes,
      lastJobPeakVramBytes: this.#peakBytes,
      vramInUseBytes: this.#activity === "idle" ? null : this.#liveBytes,
      keepAliveExpiresAt: this.#expiresAt === null ? null : new Date(this.#expiresAt).toISOString(),
      restarts: this.#restarts,
      error: this.#error,
    };
  }

  /**
   * Starts the engine (or adopts one already started, with its hello); never rejects. Concurrent
   * calls share one start.
   */
  start(adopt?: { engine: EngineClient; hello: HelloResult }): Promise<void> {
    this.#starting ??= this.#start(adopt).finally(() => {
      this.#starting = null;
      this.#deps.onChange();
    });
    return this.#starting;
  }

  /** Takes the slot for a job, or the jobs of a batch: nothing else is placed on it and its keep-alive stops. */
  acquire(jobIds: readonly string[]): void {
    if (this.#life !== "up" || this.#activity !== "idle") throw new KinoError("INTERNAL", `engine ${this.index} is not free (${this.state})`);
    this.#activity = "busy";
    this.#jobIds = jobIds;
    this.#clearTimer();
    this.#expiresAt = null;
  }

  /**
   * Checks that the engine still answers before a job uses it, and replaces one that died while idle
   * (its death is not the job's fault).
   * @throws KinoError ENGINE_UNAVAILABLE when a fresh engine cannot be started either.
   */
  async ensureAlive(): Promise<void> {
    try {
      await this.#running().hello();
    } catch (err) {
      const e = toKinoError(err);
      if (!isEngineFailure(e.code)) throw e;
      this.#deps.logger.warn(`engine ${this.index} was found dead before a job (${e.message}); starting a fresh one`);
      await this.#replace(`it was found dead: ${e.message}`, { keepActivity: true });
      if (this.#life !== "up") throw new KinoError("ENGINE_UNAVAILABLE", `engine ${this.index} could not be started again: ${this.#error}`);
    }
  }

  /** Asks an idle engine to answer within `timeoutMs`; one found dead is replaced (in the background). */
  async probe(timeoutMs: number): Promise<void> {
    const engine = this.#engine;
    if (this.#life !== "up" || this.#activity !== "idle" || engine === null) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, timeoutMs);
      timer.unref();
    });
    try {
      await Promise.race([engine.hello(), timeout]);
    } catch (err) {
      const e = toKinoError(err);
      // Still the same idle engine: nothing else has noticed or taken it meanwhile.
      if (isEngineFailure(e.code) && this.#engine === engine && this.#life === "up" && this.#activity === "idle") {
        void this.#replace(`it was found dead: ${e.message}`, { keepActivity: false });
      }
    } finally {
      clearTimeout(timer);
    }
  }

  async load(spec: ModelSpec, identity: string, onEvent?: (event: EngineEvent) => void): Promise<LoadResult> {
    this.#activity = "loading";
    // A load replaces the loaded model; a failed one leaves none.
    this.#loaded = null;
    try {
      const result = await this.#running().load(spec, { onEvent });
      this.#loaded = { identity, spec };
      this.#weightBytes = result.memory?.deviceWeightBytes ?? null;
      return result;
    } finally {
      if (this.#activity === "loading") this.#activity = "busy";
    }
  }

  async generate(job: JobSpec, options: { onEvent?: (event: EngineEvent) => void; signal?: AbortSignal }): Promise<GenerateResult> {
    const result = await this.#running().generate(job, { ...options, onEvent: this.#watching(options.onEvent) });
    this.#peakBytes = result.peakVramBytes;
    return result;
  }

  /** One forward of the loaded model at a job's shape for `jobs` jobs (EngineClient.prewarm). */
  prewarm(job: JobSpec, jobs: number): Promise<PrewarmResult> {
    return this.#running().prewarm(job, jobs);
  }

  /** Jobs of one shape as one batch (EngineClient.generateBatch): one answer per job, as each ends. */
  generateBatch(jobs: readonly BatchJobOptions[]): Promise<GenerateResult>[] {
    let answers: Promise<GenerateResult>[];
    try {
      answers = this.#running().generateBatch(jobs.map((j) => ({ ...j, onEvent: this.#watching(j.onEvent) })));
    } catch (err) {
      return jobs.map(() => Promise.reject(err));
    }
    return answers.map((answer) =>
      answer.then((result) => {
        this.#peakBytes = result.peakVramBytes;
        return result;
      }),
    );
  }

  /** `onEvent`, also keeping the device memory a step event reports as the engine's live use. */
  #watching(onEvent?: (event: EngineEvent) => void): (event: EngineEvent) => void {
    return (event) => {
      if (event.kind === "step" && event.vramBytes !== null) this.#liveBytes = event.vramBytes;
      onEvent?.(event);
    };
  }

  /**
   * Frees the slot after a job and arms the model's keep-alive: > 0 ms unloads after that long idle,
   * 0 unloads now, < 0 never.
   */
  release(keepAliveMs: number): void {
    this.#jobIds = [];
    this.#liveBytes = null;
    this.#activity = "idle";
    if (this.#life === "up" && this.#loaded !== null) {
      if (keepAliveMs === 0) {
        void this.#unload("keep-alive 0");
        return;
      }
      if (keepAliveMs > 0) {
        this.#expiresAt = this.#deps.clock.now() + keepAliveMs;
        this.#cancelTimer = this.#deps.clock.setTimer(keepAliveMs, () => void this.#unload(`keep-alive of ${formatMs(keepAliveMs)} expired`));
      }
    }
    this.#deps.onChange();
  }

  /** Replaces an engine that failed (crashed, stalled); resolves when the new one is up or failed. */
  replaceAfterFailure(reason: string): Promise<void> {
    return this.#replace(reason, { keepActivity: false });
  }

  /** Closes the engine; idempotent. A running job's generate ends (CANCELLED or ENGINE_CLOSED). */
  async close(): Promise<void> {
    if (this.#life === "closed") return;
    this.#life = "closed";
    this.#clearTimer();
    const engine = this.#engine;
    this.#engine = null;
    await engine?.close().catch(() => {});
    // A start in flight sees "closed" and closes what it started.
    await this.#starting;
  }

  async #start(adopt?: { engine: EngineClient; hello: HelloResult }): Promise<void> {
    if (this.#life === "closed") return;
    this.#life = "starting";
    this.#clearTimer();
    let engine: EngineClient | null = adopt?.engine ?? null;
    try {
      engine ??= await this.#deps.startEngine({ engine: this.index, gpu: this.gpu });
      this.#engine = engine;
      const hello = adopt?.hello ?? (await engine.hello());
      if (this.#isClosed()) {
        await engine.close();
        return;
      }
      this.#hello = hello;
      this.#life = "up";
      this.#failures = 0;
      this.#error = null;
      const gpu = hello.devices[0];
      this.#deps.logger.info(`engine ${this.index} is up on ${gpu === undefined ? "the CPU" : `${gpu.name} (${formatBytes(gpu.totalBytes)})`}`);
    } catch (err) {
      const e = toKinoError(err);
      await engine?.close().catch(() => {});
      this.#engine = null;
      if (this.#isClosed()) return;
      this.#life = "failed";
      this.#failures++;
      this.#error = `${e.code}: ${e.message}`;
      const wait = restartBackoffMs(this.#failures);
      this.#deps.logger.warn(`engine ${this.index} failed to start (${this.#error}); trying again in ${formatMs(wait)}`);
      this.#cancelTimer = this.#deps.clock.setTimer(wait, () => void this.start());
    }
  }

  async #replace(reason: string, options: { keepActivity: boolean }): Promise<void> {
    if (this.#life === "closed") return;
    this.#restarts++;
    this.#deps.logger.warn(`engine ${this.index}: replacing it (${reason})`);
    await this.#fresh(options.keepActivity);
  }

  /** Keep-alive expiry: a fresh engine, which holds no model. */
  async #unload(why: string): Promise<void> {
    if (this.#life !== "up" || this.#activity !== "idle" || this.#loaded === null) return;
    this.#deps.logger.info(`engine ${this.index}: ${why}; unloading ${this.#loaded.spec.name} (a fresh engine process: the protocol has no unload)`);
    await this.#fresh(false);
  }

  async #fresh(keepActivity: boolean): Promise<void> {
    const old = this.#engine;
    this.#engine = null;
    this.#loaded = null;
    this.#expiresAt = null;
    this.#weightBytes = null;
    this.#peakBytes = null;
    if (!keepActivity) {
      this.#activity = "idle";
      this.#jobIds = [];
    }
    this.#life = "starting";
    await old?.close().catch(() => {});
    await this.start();
  }

  #running(): EngineClient {
    if (this.#life !== "up" || this.#engine === null) {
      throw new KinoError("ENGINE_UNAVAILABLE", `engine ${this.index} is ${this.state}${this.#error === null ? "" : `: ${this.#error}`}`);
    }
    return this.#engine;
  }

  /** Whether close() was called (it may be, at any await of a start). */
  #isClosed(): boolean {
    return this.#life === "closed";
  }

  #clearTimer(): void {
    this.#cancelTimer?.();
    this.#cancelTimer = null;
  }
}

function formatMs(ms: number): string {
  if (ms % 60_000 === 0) return `${ms / 60_000} min`;
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function formatBytes(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}
