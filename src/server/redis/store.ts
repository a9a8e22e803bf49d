/**
 * The job store on Redis, shared by every `kino serve` node of a `--queue redis://…`: any node
 * answers for any job. Each change of a job and its event are written by one Lua script (atomic on
 * the server), which also publishes the event, so SSE streams on every node see events recorded by
 * any node (`watchEvents`).
 *
 * Keys, under the prefix (default "kino"):
 *   <p>:seq                 submission counter (a job's `seq`)
 *   <p>:job:<id>            hash of the job's fields, each JSON-encoded
 *   <p>:job:<id>:events     list of {at, data}; an event's seq is its place (1-based)
 *   <p>:job:<id>:artifacts  list of artifacts, in order
 *   <p>:jobs                sorted set of every job id by seq
 *   <p>:status:<status>     sorted set of the ids in that status, by seq
 *   <p>:events (channel)    every event as it is recorded, with the writer's id
 *
 * Values are encoded and decoded in TypeScript only (scripts concatenate them as text), so numbers
 * keep their precision. A standalone Redis (or a replica set behind Sentinel), not a Cluster: the
 * status keys are named inside the scripts.
 */
import { randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { KinoError } from "../../errors.ts";
import type { JobStatus } from "../schemas.ts";
import { ErrorInfo, JobEventData, JobResult } from "../schemas.ts";
import {
  JobSubmission,
  StoredArtifact,
  type JobChange,
  type JobListQuery,
  type JobPage,
  type JobStore,
  type StoredEvent,
  type StoredJob,
} from "../jobs/store.ts";

const CREATE = `
if redis.call("EXISTS", KEYS[2]) == 1 then return redis.error_reply("JOB_EXISTS") end
local seq = redis.call("INCR", KEYS[1])
redis.call("HSET", KEYS[2], "seq", seq, "status", '"queued"', "submission", ARGV[2], "createdAt", ARGV[3], "startedAt", "null",
  "finishedAt", "null", "attempts", "0", "interruptions", "0", "cancelRequested", "false", "error", "null", "result", "null")
redis.call("ZADD", KEYS[4], seq, ARGV[1])
redis.call("ZADD", KEYS[5], seq, ARGV[1])
local n = redis.call("RPUSH", KEYS[3], '{"at":' .. ARGV[3] .. ',"data":' .. ARGV[4] .. '}')
redis.call("PUBLISH", ARGV[5], '{"source":"' .. ARGV[6] .. '","jobId":"' .. ARGV[1] .. '","seq":' .. n .. ',"at":' .. ARGV[3] .. ',"data":' .. ARGV[4] .. '}')
return {n, redis.call("HGETALL", KEYS[2])}
`;

// ARGV: id, status key prefix, at, event JSON or "", artifact JSON or "", channel, source, then field/value pairs.
const UPDATE = `
if redis.call("EXISTS", KEYS[1]) == 0 then return redis.error_reply("JOB_NOT_FOUND") end
for i = 8, #ARGV, 2 do
  if ARGV[i] == "status" then
    local seq = redis.call("HGET", KEYS[1], "seq")
    redis.call("ZREM", ARGV[2] .. cjson.decode(redis.call("HGET", KEYS[1], "status")), ARGV[1])
    redis.call("ZADD", ARGV[2] .. cjson.decode(ARGV[i + 1]), seq, ARGV[1])
  end
  redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[5] ~= "" then redis.call("RPUSH", KEYS[3], ARGV[5]) end
local n = 0
if ARGV[4] ~= "" then
  n = redis.call("RPUSH", KEYS[2], '{"at":' .. ARGV[3] .. ',"data":' .. ARGV[4] .. '}')
  redis.call("PUBLISH", ARGV[6], '{"source":"' .. ARGV[7] .. '","jobId":"' .. ARGV[1] .. '","seq":' .. n .. ',"at":' .. ARGV[3] .. ',"data":' .. ARGV[4] .. '}')
end
return {n, redis.call("HGETALL", KEYS[1]), redis.call("LRANGE", KEYS[3], 0, -1)}
`;

const REMOVE = `
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
redis.call("ZREM", ARGV[2] .. cjson.decode(redis.call("HGET", KEYS[1], "status")), ARGV[1])
redis.call("ZREM", KEYS[4], ARGV[1])
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
return 1
`;

type Reply = [number, string[], string[]?];

interface Scripts {
  kinoCreate(...args: string[]): Promise<Reply>;
  kinoUpdate(...args: string[]): Promise<Reply>;
  kinoRemove(...args: string[]): Promise<number>;
}

export interface RedisStoreOptions {
  /** @default "kino" */
  readonly prefix?: string;
  /** Connection errors (the client reconnects by itself). @default ignored */
  readonly onError?: (err: Error) => void;
}

export class RedisJobStore implements JobStore {
  readonly #redis: Redis & Scripts;
  readonly #prefix: string;
  /** Tells this store's own published events from other nodes'. */
  readonly #source = randomBytes(8).toString("hex");
  #subscriber: Redis | null = null;
  readonly #listeners = new Set<(event: StoredEvent) => void>();
  #closed = false;
  readonly #onError: (err: Error) => void;

  /** @param redis a connection this store owns from now on (it closes it) */
  constructor(redis: Redis, options: RedisStoreOptions = {}) {
    this.#prefix = options.prefix ?? "kino";
    this.#onError = options.onError ?? (() => {});
    redis.on("error", this.#onError);
    redis.defineCommand("kinoCreate", { numberOfKeys: 5, lua: CREATE });
    redis.defineCommand("kinoUpdate", { numberOfKeys: 3, lua: UPDATE });
    redis.defineCommand("kinoRemove", { numberOfKeys: 4, lua: REMOVE });
    this.#redis = redis as Redis & Scripts;
  }

  async create(id: string, submission: JobSubmission, at: number, data: JobEventData): Promise<{ job: StoredJob; event: StoredEvent }> {
    this.#checkOpen();
    const event = JobEventData.parse(data);
    const [seq, hash] = await this.#redis
      .kinoCreate(
        this.#key("seq"),
        this.#job(id),
        this.#events(id),
        this.#key("jobs"),
        this.#status("queued"),
        id,
        JSON.stringify(JobSubmission.parse(submission)),
        String(at),
        JSON.stringify(event),
        this.#key("events"),
        this.#source,
      )
      .catch(replyError(id));
    return { job: this.#toJob(id, hash, []), event: { jobId: id, seq, at, data: event } };
  }

  async get(id: string): Promise<StoredJob | undefined> {
    return (await this.#getMany([id]))[0];
  }

  async list(query: JobListQuery): Promise<JobPage> {
    this.#checkOpen();
    const key = query.status === undefined ? this.#key("jobs") : this.#status(query.status);
    const low = query.afterSeq === undefined ? "-inf" : `(${query.afterSeq}`;
    const high = query.beforeSeq === undefined ? "+inf" : `(${query.beforeSeq}`;
    // One more than asked tells whether there is a next page.
    const ids =
      query.order === "asc"
        ? await this.#redis.zrangebyscore(key, low, high, "LIMIT", 0, query.limit + 1)
        : await this.#redis.zrevrangebyscore(key, high, low, "LIMIT", 0, query.limit + 1);
    const jobs = (await this.#getMany(ids.slice(0, query.limit))).filter((j) => j !== undefined);
    return { jobs, nextCursor: ids.length > query.limit ? (jobs.at(-1)?.seq ?? null) : null };
  }

  async withStatus(status: JobStatus): Promise<StoredJob[]> {
    this.#checkOpen();
    const ids = await this.#redis.zrange(this.#status(status), "0", "-1");
    return (await this.#getMany(ids)).filter((j) => j !== undefined);
  }

  async update(id: string, change: JobChange, at: number, data: JobEventData | null): Promise<{ job: StoredJob; event: StoredEvent | null }> {
    this.#checkOpen();
    // Everything is checked before the script runs: a change that cannot be recorded writes nothing.
    const event = data === null ? null : JobEventData.parse(data);
    const fields: string[] = [];
    const set = (name: string, value: unknown) => fields.push(name, JSON.stringify(value));
    if (change.status !== undefined) set("status", change.status);
    if (change.startedAt !== undefined) set("startedAt", change.startedAt);
    if (change.finishedAt !== undefined) set("finishedAt", change.finishedAt);
    if (change.attempts !== undefined) set("attempts", change.attempts);
    if (change.interruptions !== undefined) set("interruptions", change.interruptions);
    if (change.cancelRequested !== undefined) set("cancelRequested", change.cancelRequested);
    if (change.error !== undefined) set("error", change.error === null ? null : ErrorInfo.parse(change.error));
    if (change.result !== undefined) set("result", change.result === null ? null : JobResult.parse(change.result));
    const artifact = change.addArtifact === undefined ? "" : JSON.stringify(StoredArtifact.parse(change.addArtifact));
    const [seq, hash, artifacts] = await this.#redis
      .kinoUpdate(
        this.#job(id),
        this.#events(id),
        this.#artifacts(id),
        id,
        this.#key("status:"),
        String(at),
        event === null ? "" : JSON.stringify(event),
        artifact,
        this.#key("events"),
        this.#source,
        ...fields,
      )
      .catch(replyError(id));
    return { job: this.#toJob(id, hash, artifacts ?? []), event: event === null ? null : { jobId: id, seq, at, data: event } };
  }

  async events(id: string, afterSeq: number): Promise<StoredEvent[]> {
    this.#checkOpen();
    const rows = await this.#redis.lrange(this.#events(id), afterSeq, -1);
    return rows.map((row, i) => {
      const { at, data } = JSON.parse(row) as { at: number; data: unknown };
      return { jobId: id, seq: afterSeq + i + 1, at, data: JobEventData.parse(data) };
    });
  }

  async remove(id: string): Promise<boolean> {
    this.#checkOpen();
    const removed = await this.#redis.kinoRemove(this.#job(id), this.#events(id), this.#artifacts(id), this.#key("jobs"), id, this.#key("status:"));
    return removed === 1;
  }

  /** Events recorded by the other nodes sharing this Redis, as they are recorded. */
  watchEvents(listener: (event: StoredEvent) => void): () => void {
    this.#checkOpen();
    this.#listeners.add(listener);
    if (this.#subscriber === null) {
      const subscriber = this.#redis.duplicate();
      subscriber.on("error", this.#onError);
      this.#subscriber = subscriber;
      subscriber.on("message", (_channel: string, message: string) => this.#deliver(message));
      void subscriber.subscribe(this.#key("events"));
    }
    return () => void this.#listeners.delete(listener);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#listeners.clear();
    await this.#subscriber?.quit().catch(() => {});
    await this.#redis.quit().catch(() => {});
  }

  #deliver(message: string): void {
    const parsed = JSON.parse(message) as { source: string; jobId: string; seq: number; at: number; data: unknown };
    if (parsed.source === this.#source) return;
    const event: StoredEvent = { jobId: parsed.jobId, seq: parsed.seq, at: parsed.at, data: JobEventData.parse(parsed.data) };
    for (const listener of this.#listeners) listener(event);
  }

  async #getMany(ids: readonly string[]): Promise<Array<StoredJob | undefined>> {
    this.#checkOpen();
    if (ids.length === 0) return [];
    const pipeline = this.#redis.pipeline();
    for (const id of ids) pipeline.hgetall(this.#job(id)).lrange(this.#artifacts(id), 0, -1);
    const replies = (await pipeline.exec()) ?? [];
    return ids.map((id, i) => {
      const [hashError, hash] = replies[2 * i] ?? [];
      const [listError, artifacts] = replies[2 * i + 1] ?? [];
      if (hashError != null || listError != null) throw hashError ?? listError;
      const fields = hash as Record<string, string>;
      // A job removed between reading its id and its fields.
      return Object.keys(fields).length === 0 ? undefined : this.#toJob(id, fields, artifacts as string[]);
    });
  }

  /** A job from its hash (HGETALL: a flat array from a script, an object from the client). */
  #toJob(id: string, hash: string[] | Record<string, string>, artifacts: readonly string[]): StoredJob {
    const fields = Array.isArray(hash) ? Object.fromEntries(pairs(hash)) : hash;
    const value = (name: string): unknown => JSON.parse(fields[name] ?? "null");
    const error = value("error");
    const result = value("result");
    return {
      id,
      seq: Number(fields.seq),
      status: value("status") as JobStatus,
      submission: JobSubmission.parse(value("submission")),
      createdAt: value("createdAt") as number,
      startedAt: value("startedAt") as number | null,
      finishedAt: value("finishedAt") as number | null,
      attempts: value("attempts") as number,
      interruptions: value("interruptions") as number,
      cancelRequested: value("cancelRequested") as boolean,
      error: error === null ? null : ErrorInfo.parse(error),
      result: result === null ? null : JobResult.parse(result),
      artifacts: artifacts.map((a) => StoredArtifact.parse(JSON.parse(a))),
    };
  }

  #key(name: string): string {
    return `${this.#prefix}:${name}`;
  }

  #job(id: string): string {
    return this.#key(`job:${id}`);
  }

  #events(id: string): string {
    return `${this.#job(id)}:events`;
  }

  #artifacts(id: string): string {
    return `${this.#job(id)}:artifacts`;
  }

  #status(status: JobStatus): string {
    return this.#key(`status:${status}`);
  }

  #checkOpen(): void {
    if (this.#closed) throw new KinoError("SERVER_CLOSING", "the job store is closed");
  }
}

function pairs(flat: readonly string[]): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (let i = 0; i + 1 < flat.length; i += 2) out.push([flat[i]!, flat[i + 1]!]);
  return out;
}

/** The scripts' refusals in kino's catalog. */
function replyError(id: string) {
  return (err: unknown): never => {
    const message = (err as Error).message ?? "";
    if (message.includes("JOB_NOT_FOUND")) throw new KinoError("JOB_NOT_FOUND", `no job ${id}`, { field: "id" });
    if (message.includes("JOB_EXISTS")) throw new KinoError("INTERNAL", `job ${id} exists already`);
    throw err;
  };
}
