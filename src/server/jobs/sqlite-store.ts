/**
 * The embedded job store: one node:sqlite database file in the data folder. Writes are transactions
 * (a job's change and its event commit together); the journal is a WAL synced on every commit, so
 * a job accepted with 202 survives the process dying right after. The database is opened in
 * exclusive locking mode and locked at once: a second server on the same data folder is refused
 * instead of both running the same jobs.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync, type SQLInputValue, type StatementSync } from "node:sqlite";
import { KinoError } from "../../errors.ts";
import { ErrorInfo, JobEventData, JobResult, type JobStatus } from "../schemas.ts";
import {
  JobSubmission,
  StoredArtifact,
  type JobChange,
  type JobListQuery,
  type JobPage,
  type JobStore,
  type StoredEvent,
  type StoredJob,
} from "./store.ts";

/** Bumped with each change of the tables below; `migrate` brings older files up to it. */
const SCHEMA_VERSION = 1;

const SCHEMA = `
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL,
  submission TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER,
  attempts INTEGER NOT NULL DEFAULT 0,
  interruptions INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  result TEXT
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE TABLE events (
  job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,
  at INTEGER NOT NULL,
  data TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE artifacts (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  data TEXT NOT NULL
);
CREATE INDEX artifacts_by_job ON artifacts (job_id, position);
`;

interface JobRow {
  seq: number;
  id: string;
  status: string;
  submission: string;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  attempts: number;
  interruptions: number;
  cancel_requested: number;
  error: string | null;
  result: string | null;
}

/** The database file inside a data folder. */
export function databasePath(dataDir: string): string {
  return join(dataDir, "kino.db");
}

export class SqliteJobStore implements JobStore {
  readonly #db: DatabaseSync;
  readonly #stmt: Record<"get" | "insert" | "artifacts" | "events" | "lastEvent" | "insertEvent" | "insertArtifact" | "withStatus" | "remove", StatementSync>;
  #closed = false;

  /**
   * Opens (creating) the store of a data folder.
   * @throws KinoError DATA_DIR_IN_USE when another server holds it.
   */
  static open(dataDir: string): SqliteJobStore {
    // The jobs' prompts and videos are the users': not for other accounts on the machine.
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    return new SqliteJobStore(databasePath(dataDir));
  }

  /** @param file a database file, or ":memory:" */
  constructor(file: string) {
    this.#db = new DatabaseSync(file, { timeout: 0 });
    try {
      this.#db.exec("PRAGMA locking_mode = EXCLUSIVE");
      this.#db.exec("PRAGMA journal_mode = WAL");
      this.#db.exec("PRAGMA synchronous = FULL");
      this.#db.exec("PRAGMA foreign_keys = ON");
      // The first write takes the exclusive lock, held until close.
      this.#transaction(() => this.#migrate());
    } catch (err) {
      this.#db.close();
      if (isBusy(err)) {
        throw new KinoError("DATA_DIR_IN_USE", `the job database ${file} is held by another process (another kino serve?)`, { cause: err });
      }
      throw err;
    }
    const db = this.#db;
    this.#stmt = {
      get: db.prepare("SELECT * FROM jobs WHERE id = ?"),
      insert: db.prepare("INSERT INTO jobs (id, status, submission, created_at) VALUES (?, 'queued', ?, ?)"),
      artifacts: db.prepare("SELECT data FROM artifacts WHERE job_id = ? ORDER BY position"),
      events: db.prepare("SELECT seq, at, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq"),
      lastEvent: db.prepare("SELECT COALESCE(MAX(seq), 0) AS seq FROM events WHERE job_id = ?"),
      insertEvent: db.prepare("INSERT INTO events (job_id, seq, at, data) VALUES (?, ?, ?, ?)"),
      insertArtifact: db.prepare(
        "INSERT INTO artifacts (id, job_id, position, data) VALUES (?, ?, (SELECT COUNT(*) FROM artifacts WHERE job_id = ?), ?)",
      ),
      withStatus: db.prepare("SELECT * FROM jobs WHERE status = ? ORDER BY seq"),
      remove: db.prepare("DELETE FROM jobs WHERE id = ?"),
    };
  }

  async create(id: string, submission: JobSubmission, at: number, data: JobEventData): Promise<{ job: StoredJob; event: StoredEvent }> {
    return this.#transaction(() => {
      this.#stmt.insert.run(id, JSON.stringify(JobSubmission.parse(submission)), at);
      const event = this.#appendEvent(id, at, data);
      return { job: this.#get(id)!, event };
    });
  }

  async get(id: string): Promise<StoredJob | undefined> {
    this.#checkOpen();
    return this.#get(id);
  }

  async list(query: JobListQuery): Promise<JobPage> {
    this.#checkOpen();
    const where: string[] = [];
    const args: SQLInputValue[] = [];
    if (query.status !== undefined) {
      where.push("status = ?");
      args.push(query.status);
    }
    if (query.beforeSeq !== undefined) {
      where.push("seq < ?");
      args.push(query.beforeSeq);
    }
    if (query.afterSeq !== undefined) {
      where.push("seq > ?");
      args.push(query.afterSeq);
    }
    const order = query.order === "asc" ? "ASC" : "DESC";
    const sql = `SELECT * FROM jobs ${where.length > 0 ? `WHERE ${where.join(" AND ")}` : ""} ORDER BY seq ${order} LIMIT ?`;
    // One more than asked tells whether there is a next page.
    const rows = this.#db.prepare(sql).all(...args, query.limit + 1) as unknown as JobRow[];
    const page = rows.slice(0, query.limit).map((r) => this.#toJob(r));
    return { jobs: page, nextCursor: rows.length > query.limit ? page[page.length - 1]!.seq : null };
  }

  async withStatus(status: JobStatus): Promise<StoredJob[]> {
    this.#checkOpen();
    return (this.#stmt.withStatus.all(status) as unknown as JobRow[]).map((r) => this.#toJob(r));
  }

  async update(id: string, change: JobChange, at: number, data: JobEventData | null): Promise<{ job: StoredJob; event: StoredEvent | null }> {
    return this.#transaction(() => {
      const sets: string[] = [];
      const args: SQLInputValue[] = [];
      const set = (column: string, value: SQLInputValue) => {
        sets.push(`${column} = ?`);
        args.push(value);
      };
      if (change.status !== undefined) set("status", change.status);
      if (change.startedAt !== undefined) set("started_at", change.startedAt);
      if (change.finishedAt !== undefined) set("finished_at", change.finishedAt);
      if (change.attempts !== undefined) set("attempts", change.attempts);
      if (change.interruptions !== undefined) set("interruptions", change.interruptions);
      if (change.cancelRequested !== undefined) set("cancel_requested", change.cancelRequested ? 1 : 0);
      if (change.error !== undefined) set("error", change.error === null ? null : JSON.stringify(ErrorInfo.parse(change.error)));
      if (change.result !== undefined) set("result", change.result === null ? null : JSON.stringify(JobResult.parse(change.result)));
      if (sets.length > 0) {
        const { changes } = this.#db.prepare(`UPDATE jobs SET ${sets.join(", ")} WHERE id = ?`).run(...args, id);
        if (changes === 0) throw notFound(id);
      } else if (this.#get(id) === undefined) {
        throw notFound(id);
      }
      if (change.addArtifact !== undefined) {
        const artifact = StoredArtifact.parse(change.addArtifact);
        this.#stmt.insertArtifact.run(artifact.id, id, id, JSON.stringify(artifact));
      }
      const event = data === null ? null : this.#appendEvent(id, at, data);
      return { job: this.#get(id)!, event };
    });
  }

  async events(id: string, afterSeq: number): Promise<StoredEvent[]> {
    this.#checkOpen();
    const rows = this.#stmt.events.all(id, afterSeq) as unknown as Array<{ seq: number; at: number; data: string }>;
    return rows.map((r) => ({ jobId: id, seq: r.seq, at: r.at, data: JobEventData.parse(JSON.parse(r.data)) }));
  }

  async remove(id: string): Promise<boolean> {
    // Events and artifacts go with it (ON DELETE CASCADE).
    return this.#transaction(() => this.#stmt.remove.run(id).changes > 0);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#db.close();
  }

  #get(id: string): StoredJob | undefined {
    const row = this.#stmt.get.get(id) as unknown as JobRow | undefined;
    return row === undefined ? undefined : this.#toJob(row);
  }

  #appendEvent(id: string, at: number, data: JobEventData): StoredEvent {
    const parsed = JobEventData.parse(data);
    const seq = (this.#stmt.lastEvent.get(id) as { seq: number }).seq + 1;
    this.#stmt.insertEvent.run(id, seq, at, JSON.stringify(parsed));
    return { jobId: id, seq, at, data: parsed };
  }

  #toJob(row: JobRow): StoredJob {
    const artifacts = (this.#stmt.artifacts.all(row.id) as unknown as Array<{ data: string }>).map((a) => StoredArtifact.parse(JSON.parse(a.data)));
    return {
      id: row.id,
      seq: row.seq,
      status: row.status as JobStatus,
      submission: JobSubmission.parse(JSON.parse(row.submission)),
      createdAt: row.created_at,
      startedAt: row.started_at,
      finishedAt: row.finished_at,
      attempts: row.attempts,
      interruptions: row.interruptions,
      cancelRequested: row.cancel_requested === 1,
      error: row.error === null ? null : ErrorInfo.parse(JSON.parse(row.error)),
      result: row.result === null ? null : JobResult.parse(JSON.parse(row.result)),
      artifacts,
    };
  }

  #migrate(): void {
    const { user_version: version } = this.#db.prepare("PRAGMA user_version").get() as { user_version: number };
    if (version === SCHEMA_VERSION) return;
    if (version > SCHEMA_VERSION) {
      throw new KinoError("INTERNAL", `the job database was written by a newer kino (schema ${version}, this one knows ${SCHEMA_VERSION}); upgrade kino`);
    }
    this.#db.exec(SCHEMA);
    this.#db.exec(`PRAGMA user_version = ${SCHEMA_VERSION}`);
  }

  #transaction<T>(body: () => T): T {
    this.#checkOpen();
    this.#db.exec("BEGIN IMMEDIATE");
    try {
      const value = body();
      this.#db.exec("COMMIT");
      return value;
    } catch (err) {
      this.#db.exec("ROLLBACK");
      throw err;
    }
  }

  #checkOpen(): void {
    if (this.#closed) throw new KinoError("SERVER_CLOSING", "the job store is closed");
  }
}

function notFound(id: string): KinoError {
  return new KinoError("JOB_NOT_FOUND", `no job ${id}`, { field: "id" });
}

function isBusy(err: unknown): boolean {
  const e = err as { errcode?: number; message?: string };
  return e.errcode === 5 || /database is locked/i.test(e.message ?? "");
}
