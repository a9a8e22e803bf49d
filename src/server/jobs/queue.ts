/**
 * The queue of jobs waiting for an engine. The scheduler owns the order and the bound; the queue holds
 * ids and what the scheduler places and batches jobs by. `LocalJobQueue` is the in-process FIFO (the
 * job store makes it durable: a restarted server rebuilds it from the jobs stored as queued). A queue
 * shared by several machines (Redis, BullMQ) implements the same interface.
 */
import type { JobSubmission } from "./store.ts";

export interface QueuedJob {
  readonly id: string;
  /** Which loaded model serves it (model-spec.ts `modelIdentity`). */
  readonly identity: string;
  /** Jobs with equal keys could share a batched forward (model-spec.ts `batchKey`). */
  readonly batchKey: string;
  /** What the job runs: the model and parameters a batch's room is planned with. */
  readonly submission: JobSubmission;
  /** When the job was submitted (ms, the server's clock): how long it has waited for company. @default long ago */
  readonly createdAt?: number;
}

export interface JobQueue {
  readonly size: number;
  push(job: QueuedJob): void;
  /** The job that runs next, left in the queue. */
  peek(): QueuedJob | undefined;
  /** Takes a job out (it started, or was cancelled); false if it was not queued. */
  remove(id: string): boolean;
  /** 1 for the next job; null when not queued. */
  position(id: string): number | null;
  /** Every waiting job, in order. */
  waiting(): readonly QueuedJob[];
}

export class LocalJobQueue implements JobQueue {
  #jobs: QueuedJob[] = [];

  get size(): number {
    return this.#jobs.length;
  }

  push(job: QueuedJob): void {
    this.#jobs.push(job);
  }

  peek(): QueuedJob | undefined {
    return this.#jobs[0];
  }

  remove(id: string): boolean {
    const i = this.#jobs.findIndex((j) => j.id === id);
    if (i < 0) return false;
    this.#jobs.splice(i, 1);
    return true;
  }

  position(id: string): number | null {
    const i = this.#jobs.findIndex((j) => j.id === id);
    return i < 0 ? null : i + 1;
  }

  waiting(): readonly QueuedJob[] {
    return this.#jobs;
  }
}
