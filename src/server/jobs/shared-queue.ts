/**
 * A queue shared by several `kino serve` nodes (BullMQ on Redis: redis/bullmq-queue.ts). Submitted
 * jobs wait there, whichever node took the request; each node takes the next one when it has an
 * engine free, runs it, and says when it is done with it. The job store is shared too (every node
 * answers for every job), so the queue holds only ids.
 *
 * Cancellation crosses nodes: a job still waiting is taken out of the queue; one that a node holds
 * is stopped by that node when the cancellation is broadcast.
 */

/** What a node did with a job it took: finished with it (it ended, or is gone), or gave it back. */
export type TakeOutcome = "done" | "requeue";

export interface SharedQueue {
  /** Jobs waiting, all nodes together, as last counted (refreshed in the background). */
  readonly size: number;
  /** The 1-based place of a waiting job as last seen; null when it is not waiting (or not seen yet). */
  position(id: string): number | null;
  /** Adds a stored queued job; resolves once the queue holds it (durably). */
  add(id: string): Promise<void>;
  /**
   * Takes a waiting job out: "removed"; "held" when a node holds it (it runs, or is about to);
   * "absent" when the queue does not know it.
   */
  withdraw(id: string): Promise<"removed" | "held" | "absent">;
  /**
   * Starts taking jobs for this node, at most `concurrency` at a time: `take(id)` resolves when
   * the node is done with the job. A node that dies while holding a job loses it to another node
   * after the queue's lock expires (the job's recovery then decides, recovery.ts).
   */
  consume(take: (id: string) => Promise<TakeOutcome>, concurrency: number): void;
  /** Tells every node (this one included) to stop a job it holds. */
  broadcastCancel(id: string): Promise<void>;
  /** Cancellations broadcast by any node; returns the unsubscribe function. */
  onCancel(listener: (id: string) => void): () => void;
  /** Stops taking jobs, waits for the `take`s in progress, closes the connections; idempotent. */
  close(): Promise<void>;
}
