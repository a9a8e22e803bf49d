/**
 * The shared queue on BullMQ: a BullMQ job per kino job (its id is the kino job's), a Worker per
 * node whose concurrency is the node's engine count, and a Redis channel for cancellations. A job
 * a node gives back (graceful shutdown) returns to the front of the queue. A node that dies holding
 * a job stops renewing its lock; BullMQ's stalled-job check moves the job back to waiting, and
 * another node takes it (recovery.ts decides whether it runs again).
 */
import { Queue, WaitingError, Worker, type ConnectionOptions } from "bullmq";
import type { Redis } from "ioredis";
import type { Logger } from "../../log.ts";
import type { SharedQueue, TakeOutcome } from "../jobs/shared-queue.ts";

const QUEUE_NAME = "jobs";

/** How often the node counts the waiting jobs (for positions and the queue-full check). */
const REFRESH_MS = 1000;

export interface BullMqQueueOptions {
  readonly connection: ConnectionOptions;
  /** A connection for the cancellation channel's messages (subscribing holds it). */
  readonly subscriber: Redis;
  /** A connection to publish cancellations on. */
  readonly publisher: Redis;
  /** @default "kino" */
  readonly prefix?: string;
  readonly logger: Logger;
  /**
   * How long a node's hold on a job lasts without renewal (ms): how soon another node takes the
   * job of a node that died. The worker renews it at half that while the node lives.
   * @default 30000
   */
  readonly lockMs?: number;
}

export class BullMqQueue implements SharedQueue {
  readonly #options: BullMqQueueOptions;
  readonly #queue: Queue;
  readonly #channel: string;
  readonly #cancelListeners = new Set<(id: string) => void>();
  #worker: Worker | null = null;
  #waiting: string[] = [];
  readonly #refresh: NodeJS.Timeout;
  #closing: Promise<void> | null = null;

  constructor(options: BullMqQueueOptions) {
    this.#options = options;
    const prefix = `${options.prefix ?? "kino"}:bull`;
    this.#queue = new Queue(QUEUE_NAME, { connection: options.connection, prefix });
    this.#channel = `${options.prefix ?? "kino"}:cancel`;
    options.subscriber.on("message", (channel: string, id: string) => {
      if (channel === this.#channel) for (const listener of this.#cancelListeners) listener(id);
    });
    void options.subscriber.subscribe(this.#channel);
    this.#refresh = setInterval(() => void this.#count(), REFRESH_MS);
    this.#refresh.unref();
    void this.#count();
  }

  get size(): number {
    return this.#waiting.length;
  }

  position(id: string): number | null {
    const i = this.#waiting.indexOf(id);
    return i < 0 ? null : i + 1;
  }

  async add(id: string): Promise<void> {
    // Finished BullMQ jobs are removed: kino's store keeps the record, and an id must be addable again.
    await this.#queue.add("job", { id }, { jobId: id, removeOnComplete: true, removeOnFail: true });
    this.#waiting.push(id);
  }

  async withdraw(id: string): Promise<"removed" | "held" | "absent"> {
    // remove() refuses a job a worker holds (its lock), so a job is either taken out or left to its node.
    if ((await this.#queue.remove(id)) === 1) {
      this.#waiting = this.#waiting.filter((w) => w !== id);
      return "removed";
    }
    const job = await this.#queue.getJob(id);
    const state = job === undefined ? "unknown" : await job.getState();
    return state === "active" ? "held" : "absent";
  }

  consume(take: (id: string) => Promise<TakeOutcome>, concurrency: number): void {
    if (this.#worker !== null || this.#closing !== null) return;
    const lockDuration = this.#options.lockMs ?? 30_000;
    this.#worker = new Worker(
      QUEUE_NAME,
      async (job, token) => {
        const outcome = await take(job.id ?? "");
        if (outcome === "requeue") {
          await job.moveToWait(token);
          // Tells the worker the job went back to waiting, rather than completed.
          throw new WaitingError();
        }
      },
      {
        connection: this.#options.connection,
        prefix: `${this.#options.prefix ?? "kino"}:bull`,
        concurrency: Math.max(1, concurrency),
        lockDuration,
        stalledInterval: lockDuration,
        // A job found stalled goes back to waiting once; kino's recovery decides about later deaths.
        maxStalledCount: 1,
      },
    );
    this.#worker.on("error", (err) => this.#options.logger.warn(`shared queue: ${err.message}`));
    this.#worker.on("failed", (job, err) => this.#options.logger.warn(`shared queue: job ${job?.id ?? "?"}: ${err.message}`));
  }

  async broadcastCancel(id: string): Promise<void> {
    await this.#options.publisher.publish(this.#channel, id);
  }

  onCancel(listener: (id: string) => void): () => void {
    this.#cancelListeners.add(listener);
    return () => void this.#cancelListeners.delete(listener);
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      clearInterval(this.#refresh);
      this.#cancelListeners.clear();
      await this.#worker?.close();
      await this.#queue.close();
      await this.#options.subscriber.quit().catch(() => {});
      await this.#options.publisher.quit().catch(() => {});
    })();
    return this.#closing;
  }

  async #count(): Promise<void> {
    if (this.#closing !== null) return;
    try {
      const jobs = await this.#queue.getJobs(["waiting"], 0, -1, true);
      this.#waiting = jobs.map((j) => j.id ?? "");
    } catch (err) {
      this.#options.logger.debug(`shared queue: could not count the waiting jobs: ${(err as Error).message}`);
    }
  }
}
