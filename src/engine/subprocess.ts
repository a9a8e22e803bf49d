/**
 * The engine as a supervised Python worker process. Requests and answers travel as newline-delimited
 * JSON over the worker's file descriptor 3 (a duplex unix socket), never stdout, which libraries
 * print to: stdout is logged at debug, stderr is kept as a tail for errors. Every message from the
 * worker is validated against protocol/engine.ts; anything malformed is an INTERNAL error that stops
 * the worker, since the two sides no longer agree. A worker that dies fails every pending request
 * with ENGINE_CRASHED (exit status and stderr tail attached); one that sends nothing while a request
 * is pending for `stallTimeoutMs` is stopped (the timer restarts on every message, so a long job
 * that keeps reporting progress never trips it).
 */
import { spawn, type ChildProcess } from "node:child_process";
import type { Socket } from "node:net";
import type { KinoConfig } from "../config/config.ts";
import { KinoError } from "../errors.ts";
import { silentLogger, type Logger } from "../log.ts";
import {
  EngineMessage,
  EngineRequest,
  PROTOCOL_VERSION,
  ResultFor,
  type ClearCacheResult,
  type EngineEvent,
  type GenerateResult,
  type HelloResult,
  type JobSpec,
  type LoadResult,
  type ModelSpec,
  type PrewarmResult,
  type ProbeResult,
  type RequestType,
} from "../protocol/engine.ts";
import type { BatchJobOptions, EngineClient, ProbeOptions, RequestOptions } from "./client.ts";
import { pythonModuleCommand, type ProcessCommand } from "./python.ts";
import { OutputTail } from "./stderr-tail.ts";

/** The engine's side of the pipe: the file descriptor the worker reads and writes the protocol on. */
export const PROTOCOL_FD = 3;

/** The id the worker answers with when a line it read carries no usable request id. */
const UNREADABLE_REQUEST_ID = "?";

export interface SubprocessEngineOptions {
  /** The worker process; see `workerCommand`. */
  command: ProcessCommand;
  /** @default 300000 */
  stallTimeoutMs?: number;
  /** @default 5000 */
  shutdownGraceMs?: number;
  logger?: Logger;
}

interface Pending {
  readonly type: RequestType;
  readonly resolve: (result: unknown) => void;
  readonly reject: (error: KinoError) => void;
  readonly onEvent: RequestOptions["onEvent"];
}

/** An answer a request waits for under `id`: its own, or (a batch) one of its jobs'. */
interface Expected {
  readonly id: string;
  readonly type: RequestType;
  readonly onEvent?: (event: EngineEvent) => void;
}

/** The command that runs kino's Python worker, as the config says. */
export async function workerCommand(config: KinoConfig): Promise<ProcessCommand> {
  return pythonModuleCommand(config, "kino_engine.worker", [], { KINO_PROTOCOL_FD: String(PROTOCOL_FD) });
}

export class SubprocessEngine implements EngineClient {
  readonly #child: ChildProcess;
  readonly #pipe: Socket;
  readonly #pending = new Map<string, Pending>();
  readonly #stderr = new OutputTail();
  readonly #logger: Logger;
  readonly #stallTimeoutMs: number;
  readonly #shutdownGraceMs: number;
  #nextId = 1;
  #buffer = "";
  #stallTimer: NodeJS.Timeout | undefined;
  /** Set once the worker is unusable; every later request rejects with it. */
  #fatal: KinoError | undefined;
  #closing: Promise<void> | undefined;
  /** The worker sent something that breaks the protocol: nothing more it sends is believed. */
  #desynced = false;
  readonly #exited: Promise<void>;

  /** Spawns the worker. Spawning does not wait for it; the first request (usually hello) does. */
  static async start(config: KinoConfig, logger: Logger = silentLogger): Promise<SubprocessEngine> {
    return new SubprocessEngine({
      command: await workerCommand(config),
      stallTimeoutMs: config.stallTimeoutMs,
      shutdownGraceMs: config.shutdownGraceMs,
      logger,
    });
  }

  constructor(options: SubprocessEngineOptions) {
    this.#logger = options.logger ?? silentLogger;
    this.#stallTimeoutMs = options.stallTimeoutMs ?? 300_000;
    this.#shutdownGraceMs = options.shutdownGraceMs ?? 5_000;
    const { command, args, env } = options.command;
    this.#child = spawn(command, args, {
      env,
      stdio: ["ignore", "pipe", "pipe", "pipe"],
      // Its own process group: a Ctrl-C in the terminal reaches only kino, which cancels the job
      // cleanly, instead of killing the worker mid-step; close() signals the whole group.
      detached: true,
    });
    this.#pipe = this.#child.stdio[PROTOCOL_FD] as Socket;
    this.#pipe.setEncoding("utf8");
    this.#pipe.on("data", (chunk: string) => this.#onData(chunk));
    // Write errors (EPIPE after a crash) surface through the exit handling below.
    this.#pipe.on("error", (err) => this.#logger.debug(`engine pipe: ${err.message}`));
    const stdout = new OutputTail(1);
    this.#child.stdout?.setEncoding("utf8");
    this.#child.stdout?.on("data", (chunk: string) => {
      for (const line of stdout.push(chunk)) this.#logger.debug(`engine stdout: ${line}`);
    });
    this.#child.stderr?.setEncoding("utf8");
    this.#child.stderr?.on("data", (chunk: string) => {
      for (const line of this.#stderr.push(chunk)) this.#logger.debug(`engine stderr: ${line}`);
    });
    this.#exited = new Promise((resolve) => {
      // A failed spawn emits "error" and then "close"; the first reason is the one kept.
      this.#child.once("error", (err) => {
        this.#fail(new KinoError("ENGINE_UNAVAILABLE", `cannot start the engine (${command}): ${err.message}`));
      });
      // "close" comes after the pipes drain, so every message the worker sent is handled first.
      this.#child.once("close", (code, signal) => {
        this.#onExit(code, signal);
        resolve();
      });
    });
    liveWorkers.add(this.#child);
    void this.#exited.then(() => liveWorkers.delete(this.#child));
  }

  /** The process id of the worker (tests use it to kill the worker). */
  get pid(): number | undefined {
    return this.#child.pid;
  }

  /** The last lines the worker wrote to stderr. */
  get stderrTail(): string {
    return this.#stderr.text();
  }

  async hello(): Promise<HelloResult> {
    const result = await this.#request("hello", { protocol: PROTOCOL_VERSION });
    if (result.protocol !== PROTOCOL_VERSION) {
      throw new KinoError(
        "UNSUPPORTED_PROTOCOL",
        `the engine speaks protocol ${result.protocol}, this control plane ${PROTOCOL_VERSION}`,
      );
    }
    return result;
  }

  load(model: ModelSpec, options: Omit<RequestOptions, "signal"> = {}): Promise<LoadResult> {
    return this.#request("load", { model }, options);
  }

  generate(job: JobSpec, options: RequestOptions = {}): Promise<GenerateResult> {
    const { signal } = options;
    if (signal?.aborted) return Promise.reject(cancelledBeforeStart());
    const id = this.#newId("generate");
    const done = this.#cancelOnAbort(id, signal);
    return this.#request("generate", { job }, options, id).finally(done);
  }

  generateBatch(jobs: readonly BatchJobOptions[]): Promise<GenerateResult>[] {
    const members = jobs.map((options) => ({ options, id: this.#newId("generate") }));
    const live = members.filter((m) => !m.options.signal?.aborted);
    const id = this.#newId("generate_batch");
    const body = { type: "generate_batch" as const, id, jobs: live.map((m) => ({ id: m.id, job: m.options.job })) };
    const expected = live.map((m): Expected => ({ id: m.id, type: "generate", onEvent: m.options.onEvent }));
    const [batch, ...answers] = live.length === 0 ? [] : this.#send(body, [{ id, type: "generate_batch" }, ...expected]);
    const byId = new Map(live.map((m, k) => [m.id, answers[k]!.finally(this.#cancelOnAbort(m.id, m.options.signal)) as Promise<GenerateResult>]));
    // The engine answers every job before the batch: a job still waiting when the batch is answered
    // was never taken up (an engine that predates batches, a refused request), and ends as the batch did.
    const orphans = (error: unknown) => {
      for (const m of live) this.#pending.get(m.id)?.reject(error as KinoError);
      for (const m of live) this.#settle(m.id);
    };
    batch?.then(
      () => orphans(new KinoError("INTERNAL", "the engine answered the batch without answering each of its jobs")),
      (err: unknown) => orphans(tooOld(err, "generate_batch")),
    );
    return members.map((m) => byId.get(m.id) ?? Promise.reject(cancelledBeforeStart()));
  }

  /** Sends `cancel` for `id` when `signal` aborts; returns what stops listening. */
  #cancelOnAbort(id: string, signal: AbortSignal | undefined): () => void {
    const cancel = () => {
      // Fire and forget: the request (or batch job) itself answers CANCELLED once the engine stops.
      this.#request("cancel", { target: id }).catch((err: unknown) => {
        this.#logger.debug(`cancel of ${id}: ${(err as Error).message}`);
      });
    };
    signal?.addEventListener("abort", cancel, { once: true });
    return () => signal?.removeEventListener("abort", cancel);
  }

  clearCache(): Promise<ClearCacheResult> {
    return this.#request("clear_cache", {});
  }

  async probe(options: ProbeOptions = {}): Promise<ProbeResult> {
    try {
      return await this.#request("probe", { quick: options.quick ?? false });
    } catch (err) {
      throw tooOld(err, "probe");
    }
  }

  async prewarm(job: JobSpec, jobs = 1): Promise<PrewarmResult> {
    try {
      return await this.#request("prewarm", { job, jobs });
    } catch (err) {
      throw tooOld(err, "prewarm");
    }
  }

  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  async #shutdown(): Promise<void> {
    if (this.#fatal === undefined) {
      // The worker cancels a running job, answers shutdown and exits.
      this.#request("shutdown", {}).catch(() => {});
      this.#pipe.end();
    }
    this.#fatal ??= new KinoError("ENGINE_CLOSED", "the engine was closed");
    const exitedInTime = await Promise.race([
      this.#exited.then(() => true),
      delay(this.#shutdownGraceMs).then(() => false),
    ]);
    if (!exitedInTime) {
      this.#logger.debug(`engine did not exit ${this.#shutdownGraceMs} ms after shutdown; killing it`);
      this.#kill();
      await this.#exited;
    }
  }

  #newId(type: RequestType): string {
    return `${type}-${this.#nextId++}`;
  }

  #request<T extends RequestType>(
    type: T,
    body: Record<string, unknown>,
    options: RequestOptions = {},
    id: string = this.#newId(type),
  ): Promise<ResultFor[T]> {
    return this.#send({ type, id, ...body }, [{ id, type, onEvent: options.onEvent }])[0] as Promise<ResultFor[T]>;
  }

  /** Validates and writes one request; one promise per expected answer (the request's, then a batch's jobs'). */
  #send(body: { type: RequestType } & Record<string, unknown>, expected: readonly Expected[]): Promise<unknown>[] {
    const fail = (error: KinoError) => expected.map(() => Promise.reject(error));
    // Shutdown is the one request allowed while closing: it is how closing starts.
    if (this.#fatal !== undefined && body.type !== "shutdown") return fail(this.#fatal);
    const message = EngineRequest.safeParse(body);
    if (!message.success) {
      // Our own request does not match the protocol: a bug on this side, caught before the engine.
      const field = message.error.issues[0]?.path.map(String).join(".");
      return fail(new KinoError("INTERNAL", `the control plane built an invalid ${body.type} request: ${message.error.message}`, { field }));
    }
    const answers = expected.map(
      (e) =>
        new Promise<unknown>((resolve, reject) => {
          this.#pending.set(e.id, { type: e.type, resolve, reject, onEvent: e.onEvent });
        }),
    );
    this.#armStallTimer();
    this.#pipe.write(JSON.stringify(message.data) + "\n");
    return answers;
  }

  #onData(chunk: string): void {
    if (this.#desynced) return;
    this.#buffer += chunk;
    let newline: number;
    while ((newline = this.#buffer.indexOf("\n")) >= 0) {
      const line = this.#buffer.slice(0, newline).trim();
      this.#buffer = this.#buffer.slice(newline + 1);
      if (line !== "") this.#onLine(line);
      if (this.#desynced) return;
    }
  }

  #onLine(line: string): void {
    this.#armStallTimer();
    let json: unknown;
    try {
      json = JSON.parse(line);
    } catch {
      return this.#protocolViolation(`a line that is not JSON: ${line.slice(0, 200)}`);
    }
    const parsed = EngineMessage.safeParse(json);
    if (!parsed.success) {
      return this.#protocolViolation(`a message that fails the protocol schema (${issues(parsed.error)}): ${line.slice(0, 200)}`);
    }
    const message = parsed.data;
    if (message.type === "error" && message.id === UNREADABLE_REQUEST_ID) {
      // The worker could not tell which request a line was: nothing pending can be trusted to be answered.
      this.#desynced = true;
      this.#fail(KinoError.fromEngine(message.error, this.#stderr.text()));
      this.#kill();
      return;
    }
    const pending = this.#pending.get(message.id);
    if (pending === undefined) {
      this.#logger.warn(`the engine answered ${message.id}, which is not pending; ignored`);
      return;
    }
    switch (message.type) {
      case "event":
        if (message.event.kind === "log") this.#logger[message.event.level](`engine: ${message.event.message}`);
        try {
          pending.onEvent?.(message.event);
        } catch (err) {
          this.#logger.warn(`an event handler of ${message.id} threw: ${(err as Error).message}`);
        }
        return;
      case "error":
        this.#settle(message.id);
        pending.reject(KinoError.fromEngine(message.error, this.#stderr.text()));
        return;
      case "result": {
        const result = ResultFor[pending.type].safeParse(message.result);
        if (!result.success) {
          return this.#protocolViolation(`a ${pending.type} result that fails the schema (${issues(result.error)})`);
        }
        this.#settle(message.id);
        pending.resolve(result.data);
        return;
      }
    }
  }

  #settle(id: string): void {
    this.#pending.delete(id);
    if (this.#pending.size === 0) this.#disarmStallTimer();
  }

  #protocolViolation(what: string): void {
    this.#desynced = true;
    this.#fail(
      new KinoError("INTERNAL", `the engine sent ${what}; the engine was stopped`, { stderrTail: this.#stderr.text() }),
    );
    this.#kill();
  }

  #onExit(code: number | null, signal: NodeJS.Signals | null): void {
    this.#disarmStallTimer();
    const during = [...new Set([...this.#pending.values()].map((p) => p.type))].filter((t) => t !== "shutdown");
    const how = signal !== null ? `was killed by ${signal}` : `exited with code ${code}`;
    const when = during.length > 0 ? ` during ${during.join(", ")}` : "";
    const why = signal === "SIGKILL" ? " (the kernel's out-of-memory killer sends SIGKILL too)" : "";
    this.#fail(new KinoError("ENGINE_CRASHED", `the engine process ${how}${when}${why}`, { stderrTail: this.#stderr.text() }));
  }

  /** Marks the worker unusable (the first reason wins) and fails every pending request with the reason. */
  #fail(error: KinoError): void {
    this.#fatal ??= error;
    this.#disarmStallTimer();
    const pending = [...this.#pending.entries()];
    this.#pending.clear();
    for (const [, p] of pending) {
      if (p.type === "shutdown") p.resolve({});
      else p.reject(this.#fatal);
    }
  }

  #kill(): void {
    const pid = this.#child.pid;
    if (pid === undefined || this.#child.exitCode !== null || this.#child.signalCode !== null) return;
    try {
      process.kill(-pid, "SIGKILL"); // the worker's process group: it and anything it started
    } catch {
      this.#child.kill("SIGKILL");
    }
  }

  #armStallTimer(): void {
    if (this.#pending.size === 0) return;
    this.#disarmStallTimer();
    this.#stallTimer = setTimeout(() => {
      const during = [...new Set([...this.#pending.values()].map((p) => p.type))].join(", ");
      this.#fail(
        new KinoError(
          "ENGINE_STALLED",
          `the engine sent nothing for ${seconds(this.#stallTimeoutMs)} during ${during}; it was stopped`,
          { stderrTail: this.#stderr.text() },
        ),
      );
      this.#kill();
    }, this.#stallTimeoutMs);
  }

  #disarmStallTimer(): void {
    if (this.#stallTimer !== undefined) clearTimeout(this.#stallTimer);
    this.#stallTimer = undefined;
  }
}

function cancelledBeforeStart(): KinoError {
  return new KinoError("CANCELLED", "the job was cancelled before it started");
}

/** An engine older than a request answers, as for any type it does not know, BAD_REQUEST on "type": ENGINE_TOO_OLD. */
function tooOld(err: unknown, type: RequestType): unknown {
  if (err instanceof KinoError && err.code === "BAD_REQUEST" && err.field === "type") {
    return new KinoError("ENGINE_TOO_OLD", `the engine does not know the ${type} request (${err.message})`, { cause: err });
  }
  return err;
}

/** Workers still running; killed if kino exits without closing them, so none is left orphaned. */
const liveWorkers = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of liveWorkers) {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
});

function issues(error: { issues: readonly { path: readonly PropertyKey[]; message: string }[] }): string {
  return error.issues
    .slice(0, 3)
    .map((i) => `${i.path.map(String).join(".") || "message"}: ${i.message}`)
    .join("; ");
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s`;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}
