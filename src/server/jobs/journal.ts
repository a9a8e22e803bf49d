/**
 * Where every change of a job goes: the store (durably, with its event) and then the live
 * subscribers (SSE streams), in that order, so a subscriber never sees an event a replay would not.
 * The scheduler and the job service both write through it.
 */
import { EventEmitter } from "node:events";
import type { Clock } from "../clock.ts";
import type { JobEventData } from "../schemas.ts";
import type { JobChange, JobStore, JobSubmission, StoredEvent, StoredJob } from "./store.ts";

export type EventListener = (event: StoredEvent) => void;

export class JobJournal {
  readonly store: JobStore;
  readonly #clock: Clock;
  readonly #live = new EventEmitter();

  constructor(store: JobStore, clock: Clock) {
    this.store = store;
    this.#clock = clock;
    // One listener per open SSE stream of a job: there is no sensible maximum.
    this.#live.setMaxListeners(0);
    // Events other servers record in a shared store reach this server's streams too.
    store.watchEvents?.((event) => this.#publish(event));
  }

  async create(id: string, submission: JobSubmission, event: JobEventData): Promise<StoredJob> {
    const created = await this.store.create(id, submission, this.#clock.now(), event);
    this.#publish(created.event);
    return created.job;
  }

  /** Changes a job and records the event announcing it (null: a change nobody is told about). */
  async update(id: string, change: JobChange, event: JobEventData | null = null): Promise<StoredJob> {
    const updated = await this.store.update(id, change, this.#clock.now(), event);
    if (updated.event !== null) this.#publish(updated.event);
    return updated.job;
  }

  now(): number {
    return this.#clock.now();
  }

  /** Records an event that changes nothing else (progress). */
  note(id: string, event: JobEventData): Promise<StoredJob> {
    return this.update(id, {}, event);
  }

  /** Records that a job was cancelled before it started (it was taken out of a queue). */
  cancelledBeforeStart(id: string): Promise<StoredJob> {
    return this.update(
      id,
      { status: "cancelled", finishedAt: this.now(), cancelRequested: true },
      { type: "cancelled", reason: "cancelled at the client's request before it started" },
    );
  }

  /** Live events of one job from now on; returns the unsubscribe function. */
  subscribe(id: string, listener: EventListener): () => void {
    this.#live.on(id, listener);
    return () => this.#live.off(id, listener);
  }

  #publish(event: StoredEvent): void {
    this.#live.emit(event.jobId, event);
  }
}
