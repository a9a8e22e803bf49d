/**
 * The one interface the control plane talks to an engine through. Implementations: SubprocessEngine
 * (the Python worker, speaking protocol/engine.ts over a pipe) and FakeEngine (in-process, for tests
 * of everything above this seam). Both pass test/engine-conformance.ts.
 */
import type {
  ClearCacheResult,
  EngineEvent,
  GenerateResult,
  HelloResult,
  JobSpec,
  LoadResult,
  ModelSpec,
  PrewarmResult,
  ProbeResult,
} from "../protocol/engine.ts";

export interface RequestOptions {
  /** Called with each event the engine streams for the request, in order. */
  onEvent?: (event: EngineEvent) => void;
  /**
   * For generate: aborting sends `cancel`; the engine stops between steps and the call rejects with
   * CANCELLED. Aborted before the call, it rejects at once without reaching the engine.
   */
  signal?: AbortSignal;
}

/** One job of a batch, with its own events and cancellation. */
export interface BatchJobOptions extends RequestOptions {
  readonly job: JobSpec;
}

export interface ProbeOptions {
  /** Fewer repeats and smaller copies (about 2 s) instead of the full measurement (about 10 s). @default false */
  quick?: boolean;
}

export interface EngineClient {
  /** Versions, devices and host memory; checks that the engine speaks our protocol version. */
  hello(): Promise<HelloResult>;
  /** Loads a model (replacing any loaded one); streams load progress events. */
  load(model: ModelSpec, options?: Omit<RequestOptions, "signal">): Promise<LoadResult>;
  /** Runs one job on the loaded model; streams phase and step events. */
  generate(job: JobSpec, options?: RequestOptions): Promise<GenerateResult>;
  /**
   * Runs jobs of one shape (protocol BATCH_SHAPE_FIELDS) as one denoising loop, each with its own
   * prompts, seed, outputs, events and cancellation. One promise per job, in order, each settling as
   * soon as the engine answers that job: its result, or its error (CANCELLED once its signal's cancel
   * is honoured, while the others go on). A failure of the batch as a whole (an OOM in the loop, a
   * crash) rejects every job not yet answered with it; so does an engine that predates batches
   * (ENGINE_TOO_OLD) and jobs of different shapes (INTERNAL naming the field: the caller's bug).
   */
  generateBatch(jobs: readonly BatchJobOptions[]): Promise<GenerateResult>[];
  /** Drops the engine's cached prompt embeddings (after the jobs before it); says how many bytes they held. */
  clearCache(): Promise<ClearCacheResult>;
  /**
   * Measures the hardware profile of the engine's device (after the jobs before it).
   * @throws KinoError ENGINE_TOO_OLD where the engine predates the request.
   */
  probe(options?: ProbeOptions): Promise<ProbeResult>;
  /**
   * One forward of the loaded model at the job's shape for `jobs` jobs of it (a batch's rows), so
   * compile, autotuning and the attention choice are paid before the first request of that shape.
   * @throws KinoError MODEL_NOT_LOADED before a load; ENGINE_TOO_OLD where the engine predates it.
   */
  prewarm(job: JobSpec, jobs?: number): Promise<PrewarmResult>;
  /**
   * Asks the engine to shut down and waits for it, killing it after a grace period. Idempotent.
   * A running generate ends with CANCELLED (ENGINE_CLOSED where the engine had to be killed);
   * requests made after it reject with ENGINE_CLOSED.
   */
  close(): Promise<void>;
}

/** Starts an engine; injected wherever one is needed, so callers can be tested with FakeEngine. */
export type EngineFactory = () => Promise<EngineClient>;
