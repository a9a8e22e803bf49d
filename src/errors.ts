/**
 * One catalog of error codes for all of kino: the engine's codes (see protocol/engine.ts) and the
 * control plane's own. Each code has one meaning, an exit code for the CLI, an HTTP status for the
 * server, and where a generic fix exists, a hint. Errors are thrown as `KinoError` and normalized
 * at one boundary (the CLI's main, later the server's error handler); users never see a stack trace.
 */
import type { EngineError, EngineErrorCode, Phase } from "./protocol/engine.ts";

interface CodeInfo {
  /** Process exit status of the CLI. 2: the request was wrong; 1: something failed; 130: cancelled. */
  readonly exit: number;
  readonly http: number;
  /** A fix that applies to every instance of the code, shown after the message. */
  readonly hint?: string;
}

const engineCodes = {
  BAD_REQUEST: { exit: 1, http: 500, hint: "this is a bug in kino's control plane; please report it" },
  UNSUPPORTED_PROTOCOL: { exit: 1, http: 500, hint: "the engine and the CLI come from different versions; run scripts/setup.sh" },
  BAD_CHECKPOINT: { exit: 2, http: 422, hint: "download the model again (kino models pull ID) or point --model at an intact folder" },
  MODEL_NOT_LOADED: { exit: 1, http: 409 },
  DEVICE_UNAVAILABLE: { exit: 2, http: 400, hint: "run kino doctor to see the devices; use --device cpu where there is no GPU" },
  OOM: { exit: 1, http: 507, hint: "try a smaller --size or --frames, or --dtype bf16" },
  CANCELLED: { exit: 130, http: 499 },
  OUTPUT_UNWRITABLE: { exit: 2, http: 400 },
  ENCODER_FAILED: { exit: 1, http: 500, hint: "run kino doctor to check the video encoder (PyAV with libx264)" },
  INTERNAL: { exit: 1, http: 500, hint: "this is a bug; rerun with --debug and report the output" },
} as const satisfies Record<EngineErrorCode, CodeInfo>;

const controlPlaneCodes = {
  /** A flag or request field has a bad value. */
  INVALID_ARGUMENT: { exit: 2, http: 400 },
  UNKNOWN_MODEL: { exit: 2, http: 404 },
  /** A folder given as a model is not a diffusers checkpoint. */
  NOT_A_CHECKPOINT: { exit: 2, http: 400 },
  /** A checkpoint whose pipeline kino does not run. */
  UNSUPPORTED_MODEL: { exit: 2, http: 400 },
  MODEL_NOT_DOWNLOADED: { exit: 2, http: 404 },
  /** The engine process died while requests were pending. */
  ENGINE_CRASHED: { exit: 1, http: 500, hint: "rerun with --debug to see the engine's log" },
  /** The engine process cannot be started (no Python environment, no engine sources). */
  ENGINE_UNAVAILABLE: { exit: 1, http: 503, hint: "run scripts/setup.sh" },
  /** The engine sent nothing for longer than the stall timeout while a request was pending. */
  ENGINE_STALLED: { exit: 1, http: 504 },
  /** A request was made of (or pending on) an engine that was closed. */
  ENGINE_CLOSED: { exit: 1, http: 503 },
  /** The engine does not know a request this control plane sent (it predates it, e.g. probe). */
  ENGINE_TOO_OLD: { exit: 1, http: 500, hint: "the engine comes from an older kino; run scripts/setup.sh so both match" },
  /** A one-shot engine tool (make-tiny, pull) failed. */
  TOOL_FAILED: { exit: 1, http: 500 },
  /** The system ffmpeg/ffprobe is missing or failed. */
  MEDIA_TOOL_FAILED: { exit: 1, http: 500, hint: "install ffmpeg (scripts/setup.sh does it on Debian)" },
  /** The planner found no plan that fits the VRAM and RAM budget; the message names the smallest that works. */
  INFEASIBLE: { exit: 2, http: 422, hint: "raise --vram or --ram, or ask for less (a smaller --size or --frames)" },
  /** kino doctor found something required missing. */
  DOCTOR_FAILED: { exit: 1, http: 500 },
  // ---- kino serve ----
  /** No job has the id asked for. */
  JOB_NOT_FOUND: { exit: 2, http: 404 },
  /** No route answers the method and path. */
  ROUTE_NOT_FOUND: { exit: 2, http: 404, hint: "GET /openapi.json lists the routes" },
  /** The job queue is full: an immediate answer instead of a wait (backpressure). */
  QUEUE_FULL: { exit: 1, http: 429, hint: "retry later, or start kino serve with a larger --queue-size" },
  /** The server has an API key and the request did not carry it. */
  UNAUTHORIZED: { exit: 2, http: 401, hint: "send the header Authorization: Bearer <key> (the key kino serve was started with)" },
  /** A state-changing request from a page of another origin (its Origin header names another host). */
  CROSS_ORIGIN: { exit: 2, http: 403 },
  /** A request whose Host header is not this server's own name (DNS rebinding against a loopback server). */
  UNTRUSTED_HOST: { exit: 2, http: 403 },
  /** The request body is larger than the server accepts. */
  PAYLOAD_TOO_LARGE: { exit: 2, http: 413 },
  UNSUPPORTED_MEDIA_TYPE: { exit: 2, http: 415, hint: "send the body as JSON with Content-Type: application/json" },
  /** A Range header that selects no byte of the file. */
  RANGE_NOT_SATISFIABLE: { exit: 2, http: 416 },
  /** The job has already finished (completed, failed or cancelled): it cannot be cancelled. */
  JOB_FINISHED: { exit: 2, http: 409 },
  /** The job has no video (yet, or at all: it failed or was cancelled). */
  VIDEO_NOT_AVAILABLE: { exit: 2, http: 409 },
  /** The job has no preview of the step asked for (not taken, or not kept: the job did not complete). */
  PREVIEW_NOT_FOUND: { exit: 2, http: 404 },
  /** The server stopped while the job ran, more often than the recovery policy retries. */
  INTERRUPTED: { exit: 1, http: 500 },
  /** The server is shutting down and takes no new jobs. */
  SERVER_CLOSING: { exit: 1, http: 503 },
  /** No engine can run jobs (every one failed to start); /api/health says why. */
  NO_ENGINE: { exit: 1, http: 503, hint: "run kino doctor on the server machine" },
  /** kino serve was asked to bind beyond the loopback address without an API key. */
  API_KEY_REQUIRED: { exit: 2, http: 500, hint: "set $KINO_API_KEY (or --api-key), or bind to 127.0.0.1" },
  /** The Node running kino lacks something a command needs (node:sqlite for kino serve). */
  NODE_TOO_OLD: { exit: 1, http: 500, hint: "use Node 22.13 or newer (scripts/setup.sh brings one; $KINO_NODE picks it)" },
  /** Another kino serve uses the same data folder. */
  DATA_DIR_IN_USE: { exit: 1, http: 500, hint: "stop the other server, or give this one another --data-dir" },
  /** The shared queue's Redis (kino serve --queue) does not answer. */
  QUEUE_UNAVAILABLE: { exit: 1, http: 503, hint: "check that redis-server runs at the --queue address and that this machine may reach it" },
} as const satisfies Record<string, CodeInfo>;

export const ERROR_CODES: Readonly<Record<ErrorCode, CodeInfo>> = { ...engineCodes, ...controlPlaneCodes };
export type ErrorCode = keyof typeof engineCodes | keyof typeof controlPlaneCodes;

export interface KinoErrorOptions {
  /** The request field or CLI flag at fault, e.g. "frames" or "job.output.video". */
  field?: string | null;
  phase?: Phase | null;
  /** The last lines the engine wrote to stderr, where the engine was involved. */
  stderrTail?: string;
  cause?: unknown;
}

export class KinoError extends Error {
  override readonly name = "KinoError";
  readonly code: ErrorCode;
  readonly field: string | null;
  readonly phase: Phase | null;
  readonly stderrTail: string | undefined;

  constructor(code: ErrorCode, message: string, options: KinoErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.field = options.field ?? null;
    this.phase = options.phase ?? null;
    this.stderrTail = options.stderrTail;
  }

  get exitCode(): number {
    return ERROR_CODES[this.code].exit;
  }

  get httpStatus(): number {
    return ERROR_CODES[this.code].http;
  }

  get hint(): string | undefined {
    return ERROR_CODES[this.code].hint;
  }

  /** A plain object for `--json` output and HTTP bodies (no stack). */
  toJSON(): Record<string, unknown> {
    return { code: this.code, message: this.message, field: this.field, phase: this.phase };
  }

  static fromEngine(error: EngineError, stderrTail?: string): KinoError {
    return new KinoError(error.code, error.message, { field: error.field, phase: error.phase, stderrTail });
  }
}

/** Whether `code` is one of the catalog's codes (e.g. one a Python tool answered with). */
export function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(ERROR_CODES, code);
}

/** Normalizes anything thrown into a KinoError; unknown errors become INTERNAL with their message. */
export function toKinoError(error: unknown): KinoError {
  if (error instanceof KinoError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new KinoError("INTERNAL", message, { cause: error });
}
