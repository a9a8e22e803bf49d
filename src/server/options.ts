/**
 * What `kino serve` is started with, resolved once into a frozen object: the CLI flags over the
 * config's values over the defaults, each checked and named when wrong. The rule that a server
 * reachable from other machines needs an API key lives here, so no caller can skip it.
 */
import { resolve } from "node:path";
import { isIP } from "node:net";
import type { KinoConfig } from "../config/config.ts";
import { KinoError } from "../errors.ts";

/** @default 127.0.0.1: only this machine can reach the server. */
export const DEFAULT_HOST = "127.0.0.1";
/** K-I-N-O on a phone keypad. */
export const DEFAULT_PORT = 5466;
/** Jobs waiting (not running) at most; one more is answered 429 at once. */
export const DEFAULT_QUEUE_SIZE = 64;
/** How long a model stays loaded after its last job (Ollama's default too). */
export const DEFAULT_KEEP_ALIVE_MS = 5 * 60_000;
/**
 * Jobs of one shape run as one batch at most (one forward carries all of them), and only as many as
 * the plan has room for on the engine's GPU. Four keeps the wait of the batch's last job (it decodes
 * after the others) short while most of a small GPU job's launch overhead is already shared.
 */
export const DEFAULT_MAX_BATCH = 4;
/**
 * How long a request that finds an engine idle waits for others of its shape before starting, so that
 * requests sent together run as one batch: a few milliseconds against generations of seconds.
 */
export const DEFAULT_BATCH_WINDOW_MS = 25;
/** A job request is a few kilobytes of JSON; a megabyte is generous. */
export const DEFAULT_BODY_LIMIT_BYTES = 1024 * 1024;

export interface ServeOptions {
  readonly host: string;
  /** 0 picks a free port (tests). */
  readonly port: number;
  /** Required as `Authorization: Bearer <key>` when set; required to bind beyond loopback. */
  readonly apiKey: string | null;
  readonly queueSize: number;
  /** Waiting jobs of one shape run together as one batch, this many at most; 1 runs every job alone. */
  readonly maxBatch: number;
  /** How long a just-arrived job waits on an idle engine for company (ms; 0: never). @default 0 (DEFAULT_BATCH_WINDOW_MS from the CLI) */
  readonly batchWindowMs?: number;
  /** Keep-alive after a job: > 0 ms, 0 unloads at once, < 0 keeps the model loaded for good. */
  readonly keepAliveMs: number;
  readonly bodyLimitBytes: number;
  /** The job database and the jobs' outputs. */
  readonly dataDir: string;
  /**
   * A Redis shared with other nodes (redis://host:port[/db]): jobs, events and the queue live there,
   * and the data folder holds only the videos. null: this node alone, on sqlite.
   */
  readonly queue: string | null;
  /**
   * Engines compile the transformer's repeated blocks (regional torch.compile, kernels kept in kino's
   * cache folder): faster steps, paid once per shape and process (and much less once the on-disk
   * cache holds its kernels). @default false
   */
  readonly compile?: boolean;
  /** Models and shapes every engine loads and runs one forward at as the server starts (see PrewarmTarget). @default none */
  readonly prewarm?: readonly PrewarmTarget[];
}

/**
 * A model and shape to have warm before the first request: loaded (with the plan a job of that shape
 * gets, so the job finds it loaded), the attention choice and the previews' colour map made, and,
 * with compile, its blocks compiled for every batch size up to --max-batch.
 */
export interface PrewarmTarget {
  readonly model: string;
  /** WIDTHxHEIGHT; absent: the model's. */
  readonly size?: string;
  readonly frames?: number;
  /** The catalog architecture with random weights (as jobs that ask `randomWeights`: benchmarks). */
  readonly randomWeights?: boolean;
}

/** What the CLI flags carry (strings, as typed). */
export interface ServeFlags {
  readonly host?: string;
  readonly port?: string;
  readonly apiKey?: string;
  readonly queueSize?: string;
  readonly maxBatch?: string;
  readonly batchWindow?: string;
  readonly keepAlive?: string;
  readonly dataDir?: string;
  readonly queue?: string;
  readonly compile?: boolean;
  readonly prewarm?: string;
}

const invalid = (field: string, message: string) => new KinoError("INVALID_ARGUMENT", message, { field });

/**
 * Resolves and checks the server's options.
 * @throws KinoError INVALID_ARGUMENT naming the flag; API_KEY_REQUIRED for a non-loopback host without a key.
 */
export function resolveServeOptions(
  config: Pick<KinoConfig, "dataDir" | "apiKey">,
  flags: ServeFlags = {},
  cwd: string = process.cwd(),
): ServeOptions {
  const options: ServeOptions = Object.freeze({
    host: flags.host ?? DEFAULT_HOST,
    port: flags.port === undefined ? DEFAULT_PORT : wholeNumber(flags.port, "port", 0, 65_535),
    apiKey: flags.apiKey ?? config.apiKey,
    queueSize: flags.queueSize === undefined ? DEFAULT_QUEUE_SIZE : wholeNumber(flags.queueSize, "queueSize", 1, 1_000_000),
    maxBatch: flags.maxBatch === undefined ? DEFAULT_MAX_BATCH : wholeNumber(flags.maxBatch, "maxBatch", 1, 64),
    batchWindowMs: flags.batchWindow === undefined ? DEFAULT_BATCH_WINDOW_MS : wholeNumber(flags.batchWindow, "batchWindow", 0, 10_000),
    keepAliveMs: flags.keepAlive === undefined ? DEFAULT_KEEP_ALIVE_MS : parseKeepAlive(flags.keepAlive, "keepAlive"),
    bodyLimitBytes: DEFAULT_BODY_LIMIT_BYTES,
    dataDir: flags.dataDir === undefined ? config.dataDir : resolve(cwd, flags.dataDir),
    queue: flags.queue ?? null,
    compile: flags.compile ?? false,
    prewarm: flags.prewarm === undefined ? [] : parsePrewarm(flags.prewarm),
  });
  checkServeOptions(options);
  return options;
}

/**
 * "wan2.1-t2v-1.3b:832x480x81,tiny,wan2.1-t2v-14b:1280x720x81:random" → targets (a catalog id or
 * auto, optionally WIDTHxHEIGHTxFRAMES, optionally `random`: the architecture with random weights, for
 * jobs that ask `randomWeights`). The numbers are checked against the model's rules when the target is
 * prepared, as a job's are.
 * @throws KinoError INVALID_ARGUMENT naming prewarm
 */
export function parsePrewarm(text: string): PrewarmTarget[] {
  const targets = text.split(",").map((part) => part.trim());
  return targets.map((part) => {
    const match = /^([A-Za-z0-9][\w.-]*)(?::(\d+x\d+)x(\d+))?(:random)?$/.exec(part);
    if (match === null) {
      throw invalid(
        "prewarm",
        `"${part.slice(0, 100)}" is not MODEL[:WIDTHxHEIGHTxFRAMES][:random] (e.g. wan2.1-t2v-1.3b:832x480x81); separate several with commas`,
      );
    }
    return {
      model: match[1]!,
      ...(match[2] === undefined ? {} : { size: match[2], frames: Number(match[3]) }),
      ...(match[4] === undefined ? {} : { randomWeights: true }),
    };
  });
}

/** The checks every way of starting a server goes through (buildServer calls it too). */
export function checkServeOptions(o: ServeOptions): void {
  if (o.host.trim() === "") throw invalid("host", "is empty; give an address such as 127.0.0.1");
  if (o.apiKey !== null && o.apiKey.length < 16) {
    throw invalid("apiKey", "is shorter than 16 characters; use a long random key (e.g. openssl rand -hex 32)");
  }
  if (o.queue !== null) checkQueueUrl(o.queue);
  if (!isLoopbackHost(o.host) && o.apiKey === null) {
    throw new KinoError(
      "API_KEY_REQUIRED",
      `binding to ${o.host} lets other machines reach the server, so it needs an API key; none is set`,
      { field: "apiKey" },
    );
  }
}

/** @throws KinoError INVALID_ARGUMENT (field "queue") for an address that is not redis:// or rediss:// */
export function checkQueueUrl(url: string): void {
  let parsed: URL | null = null;
  try {
    parsed = new URL(url);
  } catch {
    // Reported below.
  }
  if (parsed === null || !["redis:", "rediss:"].includes(parsed.protocol) || parsed.hostname === "") {
    const shown = parsed === null ? url.slice(0, 200) : `${parsed.protocol}//${parsed.host}${parsed.pathname}`;
    throw invalid("queue", `must be a Redis address such as redis://host:6379 (rediss:// for TLS); got "${shown}"`);
  }
}

/** A Redis address without its password, for messages. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password !== "") u.password = "***";
    return u.toString();
  } catch {
    return url.slice(0, 200);
  }
}

/** Whether an address or name only reaches this machine: localhost, 127.0.0.0/8, ::1. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, "$1");
  if (h === "localhost" || h.endsWith(".localhost")) return true;
  if (isIP(h) === 4) return h.startsWith("127.");
  if (isIP(h) === 6) return h === "::1" || h === "0:0:0:0:0:0:0:1" || h.startsWith("::ffff:127.");
  return false;
}

const DURATION_UNITS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/**
 * A keep-alive as Ollama spells it: "5m", "30s", "1h", "250ms", a bare number of seconds, 0 (unload
 * right after the job) or a negative value (keep the model loaded until the server stops).
 */
export function parseKeepAlive(value: string | number, field: string): number {
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw invalid(field, `must be a finite number of seconds; got ${value}`);
    return value < 0 ? -1 : Math.round(value * 1000);
  }
  const match = /^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(value);
  if (match === null) throw invalid(field, `must be a duration such as 5m, 30s, 1h, 0 (unload at once) or -1 (keep loaded); got "${value}"`);
  const amount = Number(match[1]);
  if (amount < 0) return -1;
  return Math.round(amount * DURATION_UNITS[match[2] ?? "s"]!);
}

function wholeNumber(value: string, field: string, min: number, max: number): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isInteger(n) || n < min || n > max) {
    throw invalid(field, `must be a whole number from ${min} to ${max}; got "${value}"`);
  }
  return n;
}
