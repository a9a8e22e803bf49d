/**
 * The scheduler's decisions as pure functions, table-tested without engines: which engine takes a
 * job, whether an out-of-memory error is retried, whether an error means the engine process is gone,
 * which waiting jobs share a forward (batching; see `selectBatch`) and the keep-alive after a batch.
 */
import type { ErrorCode } from "../../errors.ts";

/** What the scheduler knows about an engine when it places a job. */
export interface SlotView {
  readonly index: number;
  /** Started and not running or loading anything. */
  readonly free: boolean;
  /** Identity of the loaded model (see `modelIdentity`), null when none is. */
  readonly loaded: string | null;
  /** When its keep-alive ends (ms since the epoch); null: never, or nothing loaded. */
  readonly expiresAt: number | null;
}

/**
 * The engine for a job whose model is `identity`, or null when none is free: one that has the model
 * loaded (no load), else one with nothing loaded, else the one whose model would be unloaded soonest
 * anyway (Ollama evicts the same way). A free engine is always taken over waiting for a warm busy
 * one: another GPU loading the model beats queueing behind a running job.
 */
export function pickSlot(slots: readonly SlotView[], identity: string): number | null {
  const free = slots.filter((s) => s.free);
  const warm = free.find((s) => s.loaded === identity) ?? free.find((s) => s.loaded === null);
  if (warm !== undefined) return warm.index;
  let evict: SlotView | undefined;
  for (const s of free) if (evict === undefined || (s.expiresAt ?? Infinity) < (evict.expiresAt ?? Infinity)) evict = s;
  return evict?.index ?? null;
}

/** How many times a job that ran out of device memory is run again. */
export const OOM_RETRIES = 1;

/** The share of free VRAM a retry's plan keeps unused (the planner's default keeps 10%). */
export const OOM_RETRY_MARGIN = 0.25;

export interface OomDecision {
  readonly retry: boolean;
  /** Why, for the log and the job's notice event. */
  readonly reason: string;
  /** The margin to plan the retry with (a safer plan), where the job is planned. */
  readonly margin: number;
}

/**
 * After an OOM the engine has freed what it could (its caches, the failed step's tensors). A planned
 * job is retried once with a safer plan: planned again keeping a quarter of the VRAM free, which
 * moves weights off the device or tiles the decode where the prediction was too tight. An unplanned
 * one (CPU, tiny) is retried once as it was: memory held by an earlier job may have been the cause.
 */
export function decideOomRetry(retriesSoFar: number, planned: boolean): OomDecision {
  if (retriesSoFar >= OOM_RETRIES) {
    return { retry: false, reason: `out of device memory again after ${retriesSoFar} retry; giving up`, margin: OOM_RETRY_MARGIN };
  }
  const how = planned
    ? `with a safer plan (${Math.round(OOM_RETRY_MARGIN * 100)}% of the GPU's free memory kept unused)`
    : "after the engine freed its caches and the failed step's memory";
  return { retry: true, reason: `out of device memory; retrying once ${how}`, margin: OOM_RETRY_MARGIN };
}

/** Errors after which the engine process is gone or unusable: it is replaced by a fresh one. */
export function isEngineFailure(code: ErrorCode): boolean {
  return code === "ENGINE_CRASHED" || code === "ENGINE_STALLED" || code === "ENGINE_CLOSED" || code === "ENGINE_UNAVAILABLE";
}

/** Delay before starting an engine again after its start failed `failures` times in a row: 1 s doubling to 1 min. */
export function restartBackoffMs(failures: number): number {
  return Math.min(60_000, 1000 * 2 ** Math.max(0, failures - 1));
}

/**
 * The jobs to run as one batch with `next` (first in the queue): it, then the waiting jobs that share
 * its model and shape (`batchKey`), in queue order, `limit` jobs at most. A job of another shape
 * between them keeps its place in the queue; it runs once an engine is free for it. The caller trims
 * the batch further to what the engine's plan has room for (admission.ts `batchRoom`).
 */
export function selectBatch<T extends { readonly id: string; readonly batchKey: string }>(next: T, waiting: readonly T[], limit: number): T[] {
  const batch = [next];
  for (const job of waiting) {
    if (batch.length >= limit) break;
    if (job.id !== next.id && job.batchKey === next.batchKey) batch.push(job);
  }
  return batch;
}

/**
 * The keep-alive after a batch, from its jobs' (each the request's or the server's): the model stays
 * as long as the longest asks; one job asking to keep it for good (< 0) keeps it for good.
 */
export function batchKeepAlive(keepAlives: readonly number[]): number {
  return keepAlives.some((ms) => ms < 0) ? -1 : Math.max(...keepAlives);
}

/**
 * After a batch ran out of device memory, each of its jobs runs again alone: the batch's extra
 * activations are the likeliest cause, and a job alone still has its own OOM retry (decideOomRetry).
 */
export function batchOomRetryReason(size: number): string {
  return `out of device memory in a batch of ${size} jobs; running it again alone`;
}
