/**
 * The measured hardware profile. `hardwareFromProbe` maps what the engine measured (the `probe`
 * request's ProbeResult) onto the planner's HardwareProfile; `ProbeCache` keeps measurements on disk
 * in kino's cache folder, one file per (GPU name, driver, torch, host), so that a machine is probed
 * once: `probeCached` answers from the file while it is younger than the age limit and asks the
 * engine otherwise. `measuredProfiles` holds what this process measured, for code that knows a GPU
 * only by the name `hello` reported (the server's planning).
 *
 * The key cannot see everything that changes a rate (a card moved to another slot, a BIOS PCIe
 * setting, a new host with the same name): the age limit is for those, and `refresh` re-measures.
 */
import { createHash } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { z } from "zod";
import type { EngineClient } from "../engine/client.ts";
import { KinoError } from "../errors.ts";
import { silentLogger, type Logger } from "../log.ts";
import { ProbeResult, type HelloResult } from "../protocol/engine.ts";
import { DEFAULT_DISK_READ, type HardwareProfile } from "./hardware.ts";

/** How long a measurement stands. @default 30 days */
export const PROBE_MAX_AGE_MS = 30 * 24 * 3600 * 1000;

/** What a measurement is valid for: the GPU model, its driver and torch (their kernels), and the machine. */
export const ProbeKey = z.object({
  /** The first GPU's name as hello reports it ("cpu" where there is none). */
  gpu: z.string(),
  driver: z.string().nullable(),
  torch: z.string(),
  host: z.string(),
});
export type ProbeKey = z.infer<typeof ProbeKey>;

const CacheFile = z.object({
  version: z.literal(1),
  key: ProbeKey,
  /** When the engine measured it (ISO 8601). */
  probedAt: z.iso.datetime(),
  result: ProbeResult,
});

export interface CachedProbe {
  readonly key: ProbeKey;
  readonly probedAt: string;
  readonly result: ProbeResult;
  /** The cache file. */
  readonly path: string;
  /** Whether it came from the file (true) or was measured now (false). */
  readonly cached: boolean;
}

export function probeKey(hello: HelloResult, host: string = hostname()): ProbeKey {
  return { gpu: hello.devices[0]?.name ?? "cpu", driver: hello.driver ?? null, torch: hello.torch, host };
}

export interface ProbeCacheOptions {
  /** The folder of the cache files (kino's is `<cache>/probe`). */
  readonly dir: string;
  /** @default PROBE_MAX_AGE_MS */
  readonly maxAgeMs?: number;
  /** @default Date.now */
  readonly now?: () => number;
  readonly logger?: Logger;
}

export interface ProbeAsk {
  /** A quick measurement answers a quick ask only; a full one answers both. @default false */
  readonly quick?: boolean;
  /** Measure again whatever the cache holds. @default false */
  readonly refresh?: boolean;
}

export class ProbeCache {
  readonly dir: string;
  readonly maxAgeMs: number;
  readonly #now: () => number;
  readonly #logger: Logger;

  constructor(options: ProbeCacheOptions) {
    this.dir = options.dir;
    this.maxAgeMs = options.maxAgeMs ?? PROBE_MAX_AGE_MS;
    this.#now = options.now ?? Date.now;
    this.#logger = options.logger ?? silentLogger;
  }

  /** `<dir>/<gpu>-<hash of the key>.json`: readable in a listing, unique per key. */
  pathFor(key: ProbeKey): string {
    const slug = key.gpu.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "device";
    const hash = createHash("sha256").update(keyText(key)).digest("hex").slice(0, 12);
    return join(this.dir, `${slug}-${hash}.json`);
  }

  /** The stored measurement for `key`, or null: none, expired, too quick for the ask, or unreadable (logged). */
  async read(key: ProbeKey, ask: Pick<ProbeAsk, "quick"> = {}): Promise<CachedProbe | null> {
    const path = this.pathFor(key);
    let text: string;
    try {
      text = await readFile(path, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") this.#logger.warn(`cannot read the probe cache ${path} (${(err as Error).message}); measuring again`);
      return null;
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    const parsed = CacheFile.safeParse(json);
    if (!parsed.success) {
      // A torn write, an older format, a hand edit: the next measurement replaces the file.
      const issue = parsed.error.issues[0];
      const why = json === undefined ? "not JSON" : `${issue?.path.join(".") || "file"}: ${issue?.message}`;
      this.#logger.warn(`ignoring the probe cache ${path}, which is not a measurement kino wrote (${why}); measuring again`);
      return null;
    }
    const entry = parsed.data;
    if (keyText(entry.key) !== keyText(key)) return null; // another key's file under this name
    const age = this.#now() - Date.parse(entry.probedAt);
    if (!(age >= 0 && age <= this.maxAgeMs)) {
      this.#logger.debug(`the probe cache ${path} is ${age < 0 ? "from the future" : `${Math.round(age / 3600_000)} h old`}; measuring again`);
      return null;
    }
    if (entry.result.quick && !ask.quick) return null;
    return { key, probedAt: entry.probedAt, result: entry.result, path, cached: true };
  }

  /** Stores a measurement for `key` (a temporary file renamed over the old one: never half-written). */
  async write(key: ProbeKey, result: ProbeResult): Promise<CachedProbe> {
    const path = this.pathFor(key);
    const probedAt = new Date(this.#now()).toISOString();
    await mkdir(this.dir, { recursive: true });
    const temp = `${path}.${process.pid}.tmp`;
    await writeFile(temp, JSON.stringify({ version: 1, key, probedAt, result }, null, 2) + "\n");
    await rename(temp, path);
    return { key, probedAt, result, path, cached: false };
  }
}

/** The measurement of the engine's device: the cache's while it stands, else the engine's (then stored). */
export async function probeCached(engine: EngineClient, hello: HelloResult, cache: ProbeCache, ask: ProbeAsk = {}): Promise<CachedProbe> {
  const key = probeKey(hello);
  if (!ask.refresh) {
    const hit = await cache.read(key, ask);
    if (hit !== null) return hit;
  }
  return cache.write(key, await engine.probe({ quick: ask.quick ?? false }));
}

/**
 * The planner's profile of a probed GPU. Where the model's width is given, the GEMM and attention
 * rates are those measured at the nearest width (a narrow model's products run further from the
 * peak); otherwise the median of the shapes measured. Host RAM is the cgroup's limit where lower; the
 * disk rate is the measured one where the probe could measure it, else DEFAULT_DISK_READ.
 * @throws KinoError DEVICE_UNAVAILABLE for a measurement of the host alone (no GPU to plan for).
 */
export function hardwareFromProbe(result: ProbeResult, options: { modelWidth?: number } = {}): HardwareProfile {
  const { vramTotalBytes, vramFreeBytes, h2dBytesPerS, d2hBytesPerS } = result;
  if (result.device !== "cuda" || vramTotalBytes === null || vramFreeBytes === null || h2dBytesPerS === null || d2hBytesPerS === null || result.gemm.length === 0 || result.attention.length === 0) {
    throw new KinoError("DEVICE_UNAVAILABLE", `the probe measured no GPU (only the host, ${result.name}): there is nothing to plan on; name a profile instead (--gpu h100-80gb or rtx4090-24gb)`, { field: "gpu" });
  }
  const width = options.modelWidth;
  return Object.freeze({
    name: `${result.name} (measured)`,
    vramTotal: vramTotalBytes,
    vramFree: vramFreeBytes,
    hostRam: Math.min(result.hostRamBytes, result.memoryLimitBytes ?? Infinity),
    pinnedLimit: result.pinnedLimitBytes,
    h2d: h2dBytesPerS,
    d2h: d2hBytesPerS,
    gemmFlops: rateAt(result.gemm.map((g) => ({ width: g.n, rate: g.flopsPerS })), width),
    attentionFlops: rateAt(result.attention.map((a) => ({ width: a.heads * a.headDim, rate: a.flopsPerS })), width),
    cpuFlops: result.cpuGemm.flopsPerS,
    diskRead: result.diskReadBytesPerS ?? DEFAULT_DISK_READ,
  });
}

/**
 * `reported` (VRAM and RAM as the engine reports them now) with a probe's measured copy and compute
 * rates and pinned cap; the rates are the ones at `modelWidth` where given (see hardwareFromProbe).
 */
export function withMeasuredRates(reported: HardwareProfile, result: ProbeResult, modelWidth?: number): HardwareProfile {
  const m = hardwareFromProbe(result, { modelWidth });
  const diskRead = result.diskReadBytesPerS ?? reported.diskRead; // a probe that could not measure the disk keeps the assumed rate
  return { ...reported, pinnedLimit: m.pinnedLimit, h2d: m.h2d, d2h: m.d2h, gemmFlops: m.gemmFlops, attentionFlops: m.attentionFlops, cpuFlops: m.cpuFlops, diskRead };
}

/** The rate measured at the width nearest `width` (the wider on a tie), or the median without one. */
export function rateAt(measures: readonly { width: number; rate: number }[], width?: number): number {
  if (measures.length === 0) throw new Error("no measurement to take a rate from");
  if (width !== undefined) {
    const distance = (w: number) => Math.abs(Math.log(w / width));
    return [...measures].sort((a, b) => distance(a.width) - distance(b.width) || b.width - a.width)[0]!.rate;
  }
  const rates = measures.map((m) => m.rate).sort((a, b) => a - b);
  const mid = rates.length >> 1;
  return rates.length % 2 === 1 ? rates[mid]! : (rates[mid - 1]! + rates[mid]!) / 2;
}

/**
 * What this process measured, by GPU name. The server plans where it knows a GPU only by the name
 * and memory its engine's hello reported; `apply` puts the measured rates and pinned cap under them.
 */
export class MeasuredProfiles {
  readonly #byGpu = new Map<string, ProbeResult>();

  /** Keeps a GPU's measurement (one of the host alone is not kept: it has no GPU rates). */
  remember(result: ProbeResult): void {
    if (result.device === "cuda") this.#byGpu.set(result.name, result);
  }

  has(gpuName: string): boolean {
    return this.#byGpu.has(gpuName);
  }

  /** `reported` with the measured copy and compute rates and pinned cap of `gpuName`, where it was probed; else `reported`. */
  apply(reported: HardwareProfile, gpuName: string): HardwareProfile {
    const result = this.#byGpu.get(gpuName);
    return result === undefined ? reported : { ...withMeasuredRates(reported, result), name: hardwareFromProbe(result).name };
  }

  clear(): void {
    this.#byGpu.clear();
  }
}

/** The process's measured profiles (kino serve fills it as its engines start; see api/probe.ts). */
export const measuredProfiles = new MeasuredProfiles();

function keyText(key: ProbeKey): string {
  return JSON.stringify([key.gpu, key.driver, key.torch, key.host]);
}
