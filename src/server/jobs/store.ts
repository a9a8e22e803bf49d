/**
 * The job store: jobs, their events (what SSE replays) and their artifacts, durable across restarts.
 * One interface, so the embedded node:sqlite store (sqlite-store.ts) can be joined by others (a
 * Redis-backed one for several machines). Every method that changes a job does it atomically with
 * the event that announces the change: a reader never sees a status without its event, or the reverse.
 * Methods are async, though sqlite answers at once, so that a networked store fits the same shape.
 */
import { z } from "zod";
import { JobParams, type ErrorInfo, type JobEventData, type JobResult, type JobStatus } from "../schemas.ts";

/** The model a job runs, as resolved when it was submitted. */
export const JobModel = z.object({
  /** The catalog id. */
  name: z.string(),
  /** The checkpoint folder; null for random weights. */
  path: z.string().nullable(),
  randomWeights: z.boolean(),
  /** kino's tiny model: made on first use when its folder is missing. */
  tiny: z.boolean(),
});
export type JobModel = z.infer<typeof JobModel>;

/** Everything decided at submission: what to run and how, independent of the engine that runs it. */
export const JobSubmission = z.object({
  model: JobModel,
  params: JobParams,
  /** Asked precision; null: bf16 on a GPU, fp32 on the CPU. */
  dtype: z.enum(["bf16", "fp16", "fp32"]).nullable(),
  /** The request's keep-alive in ms (see ServeOptions.keepAliveMs); null: the server's. */
  keepAliveMs: z.number().nullable(),
  /**
   * A preview every this many denoising steps (and at the last), the request's or the server's
   * default resolved; 0: none. Jobs stored before previews existed have none: 0.
   */
  previewEvery: z.number().int().nonnegative().default(0),
});
export type JobSubmission = z.infer<typeof JobSubmission>;

export const StoredArtifact = z.object({
  id: z.string(),
  kind: z.literal("video"),
  /** A file name inside the job's folder (never a path). */
  file: z.string().regex(/^[\w.-]+$/),
  contentType: z.string(),
  bytes: z.number().int().nonnegative(),
});
export type StoredArtifact = z.infer<typeof StoredArtifact>;

export interface StoredJob {
  readonly id: string;
  /** Submission order: what lists sort by and cursors point at. */
  readonly seq: number;
  readonly status: JobStatus;
  readonly submission: JobSubmission;
  /** Milliseconds since the epoch. */
  readonly createdAt: number;
  readonly startedAt: number | null;
  readonly finishedAt: number | null;
  /** Times the job was started. */
  readonly attempts: number;
  /** Times the server stopped without a clean shutdown while the job ran (see recovery.ts). */
  readonly interruptions: number;
  readonly cancelRequested: boolean;
  readonly error: ErrorInfo | null;
  readonly result: JobResult | null;
  readonly artifacts: readonly StoredArtifact[];
}

export interface StoredEvent {
  readonly jobId: string;
  /** 1, 2, … per job: the SSE event id. */
  readonly seq: number;
  /** Milliseconds since the epoch. */
  readonly at: number;
  readonly data: JobEventData;
}

/** The fields a transition may set; absent fields keep their value. */
export interface JobChange {
  readonly status?: JobStatus;
  readonly startedAt?: number | null;
  readonly finishedAt?: number | null;
  readonly attempts?: number;
  readonly interruptions?: number;
  readonly cancelRequested?: boolean;
  readonly error?: ErrorInfo | null;
  readonly result?: JobResult | null;
  /** Appended to the job's artifacts. */
  readonly addArtifact?: StoredArtifact;
}

export interface JobPage {
  /** In the order asked for (newest first unless `order` is "asc"). */
  readonly jobs: readonly StoredJob[];
  /** Pass as `beforeSeq` (newest first) or `afterSeq` (oldest first) for the next page; null on the last page. */
  readonly nextCursor: number | null;
}

export interface JobListQuery {
  readonly status?: JobStatus;
  readonly limit: number;
  /** Only jobs submitted before this one (its `seq`). */
  readonly beforeSeq?: number;
  /** Only jobs submitted after this one (its `seq`). */
  readonly afterSeq?: number;
  /** @default "desc" (newest first) */
  readonly order?: "asc" | "desc";
}

export interface JobStore {
  /** Inserts a queued job with its first event, atomically. */
  create(id: string, submission: JobSubmission, at: number, event: JobEventData): Promise<{ job: StoredJob; event: StoredEvent }>;
  get(id: string): Promise<StoredJob | undefined>;
  /** A page of jobs, newest first unless asked otherwise, optionally of one status. */
  list(query: JobListQuery): Promise<JobPage>;
  /** Every job in a status, oldest first (what a restarted server queues again or recovers). */
  withStatus(status: JobStatus): Promise<StoredJob[]>;
  /**
   * Applies a change to a job and appends its event (if any), atomically.
   * @throws KinoError JOB_NOT_FOUND
   */
  update(id: string, change: JobChange, at: number, event: JobEventData | null): Promise<{ job: StoredJob; event: StoredEvent | null }>;
  /** The job's events with seq > afterSeq, in order. */
  events(id: string, afterSeq: number): Promise<StoredEvent[]>;
  /** Deletes a job with its events and artifacts; false when there was none. */
  remove(id: string): Promise<boolean>;
  /**
   * A store shared by several servers (Redis) delivers the events the others record, as they are
   * recorded, so every server's event streams see every job; a store of one server has nothing to
   * deliver and leaves this out. Returns the unsubscribe function.
   */
  watchEvents?(listener: (event: StoredEvent) => void): () => void;
  /** Idempotent. */
  close(): Promise<void>;
}
