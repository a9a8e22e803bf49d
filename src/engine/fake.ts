/**
 * An in-process engine for testing everything above the engine seam without Python. It behaves like
 * the real one where callers can tell: the same events in the same order (phases start/end, steps
 * 1..n), cancellation honoured between steps, the same error codes for the same situations (not
 * loaded, bad checkpoint, unwritable output, no GPU), and real outputs: ffmpeg's test pattern as an
 * H.264 MP4 and PNG frames of the job's size, length and rate, and the previews a job asks for (real
 * PNGs at the latents' size, a gradient whose colour moves with the step). A batch runs as the engine
 * runs it: shared text encode and denoise phases, a cancelled job answered between steps while the
 * others go on, then each job decoded and written in turn. It knows nothing of tensors.
 */
import { constants } from "node:fs";
import { access, readdir, stat } from "node:fs/promises";
import { cpus, freemem, totalmem } from "node:os";
import { dirname } from "node:path";
import { crc32, deflateSync } from "node:zlib";
import { z } from "zod";
import { inspectCheckpoint } from "../catalog/checkpoint.ts";
import { KinoError } from "../errors.ts";
import { renderPatternFrames, renderPatternVideo } from "../media/test-pattern.ts";
import { toolVersion } from "../media/exec.ts";
import {
  GenerateBatchRequest,
  JobSpec,
  ModelSpec,
  PrewarmRequest,
  PROTOCOL_VERSION,
  type ClearCacheResult,
  type DeviceInfo,
  type EngineEvent,
  type GenerateResult,
  type HelloResult,
  type LoadResult,
  type Phase,
  type PrewarmResult,
  type ProbeResult,
} from "../protocol/engine.ts";
import type { BatchJobOptions, EngineClient, ProbeOptions, RequestOptions } from "./client.ts";

export interface FakeEngineOptions {
  /** GPUs the fake reports; with none, `cuda` is unavailable. @default [] */
  devices?: DeviceInfo[];
  /** Time each denoising step takes. @default 5 */
  stepMs?: number;
  /** @default "ffmpeg" */
  ffmpeg?: string;
  /** What probe answers (its `quick` is the request's); @default made-up rates for the first device, or the host alone */
  probe?: ProbeResult;
}

/** A job the fake runs (alone, or one of a batch) and where its answer goes. */
interface FakeJob {
  readonly options: RequestOptions;
  readonly resolve: (result: GenerateResult) => void;
  readonly reject: (error: unknown) => void;
}

/** The model's native frame rate the fake reports (Wan's). */
const FAKE_FPS = 16;
/** Pixels per latent pixel on each side (Wan's VAE): previews are the latents' size. */
const FAKE_VAE_SCALE = 8;
/** Bytes the fake counts per cached prompt embedding (Wan's 512 x 4096 bf16 tensor). */
const FAKE_EMBEDDING_BYTES = 512 * 4096 * 2;

export class FakeEngine implements EngineClient {
  readonly #devices: DeviceInfo[];
  readonly #stepMs: number;
  readonly #ffmpeg: string;
  readonly #probe: ProbeResult | undefined;
  /** Every prewarm this engine ran (a forward's shape and its jobs), for tests. */
  readonly prewarmed: { job: JobSpec; jobs: number }[] = [];
  #loaded: ModelSpec | null = null;
  /** Prompts "encoded" since the model was loaded, as the engine's embedding cache keeps them. */
  #cachedPrompts = new Set<string>();
  #closed = false;
  /** Jobs run one at a time, like the real worker's loop. */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(options: FakeEngineOptions = {}) {
    this.#devices = options.devices ?? [];
    this.#stepMs = options.stepMs ?? 5;
    this.#ffmpeg = options.ffmpeg ?? "ffmpeg";
    this.#probe = options.probe;
  }

  async hello(): Promise<HelloResult> {
    this.#checkOpen();
    return {
      protocol: PROTOCOL_VERSION,
      engineVersion: "fake",
      python: "none (in-process fake)",
      torch: "none",
      cuda: this.#devices.length > 0 ? "fake" : null,
      diffusers: "none",
      transformers: "none",
      encoder: { name: "ffmpeg", version: await toolVersion(this.#ffmpeg), h264: true },
      devices: this.#devices,
      hostRamBytes: totalmem(),
      hostRamAvailableBytes: freemem(),
    };
  }

  load(model: ModelSpec, options: Omit<RequestOptions, "signal"> = {}): Promise<LoadResult> {
    return this.#serial(() => this.#load(model, options));
  }

  generate(job: JobSpec, options: RequestOptions = {}): Promise<GenerateResult> {
    if (options.signal?.aborted) return Promise.reject(new KinoError("CANCELLED", "the job was cancelled before it started"));
    const [answer] = this.#queueJobs([options], () => [parseRequest(JobSpec, job, "job")]);
    return answer!;
  }

  generateBatch(jobs: readonly BatchJobOptions[]): Promise<GenerateResult>[] {
    // Checked as SubprocessEngine checks the request before sending it: jobs of different shapes are
    // the caller's bug (INTERNAL), named by the field that differs.
    const request = { type: "generate_batch", id: "fake-batch", jobs: jobs.map((o, k) => ({ id: `fake-job-${k}`, job: o.job })) };
    const checked = GenerateBatchRequest.safeParse(request);
    if (!checked.success) {
      const field = checked.error.issues[0]?.path.map(String).join(".");
      const error = new KinoError("INTERNAL", `the control plane built an invalid generate_batch request: ${checked.error.message}`, { field });
      return jobs.map(() => Promise.reject(error));
    }
    return this.#queueJobs(jobs, () => checked.data.jobs.map((j) => j.job));
  }

  clearCache(): Promise<ClearCacheResult> {
    return this.#serial(async () => {
      this.#checkOpen();
      const freedBytes = this.#cachedPrompts.size * FAKE_EMBEDDING_BYTES;
      this.#cachedPrompts.clear();
      return { freedBytes };
    });
  }

  probe(options: ProbeOptions = {}): Promise<ProbeResult> {
    return this.#serial(async () => {
      this.#checkOpen();
      const quick = options.quick ?? false;
      return { ...(this.#probe ?? fakeProbe(this.#devices[0], quick)), quick };
    });
  }

  prewarm(job: JobSpec, jobs = 1): Promise<PrewarmResult> {
    return this.#serial(async () => {
      this.#checkOpen();
      // What SubprocessEngine's request validation refuses, refused here too.
      const checked = PrewarmRequest.safeParse({ type: "prewarm", id: "fake", job, jobs });
      if (!checked.success) throw new KinoError("INTERNAL", `the control plane built an invalid prewarm request: ${checked.error.message}`);
      if (this.#loaded === null) throw new KinoError("MODEL_NOT_LOADED", "prewarm before load: send a load request first");
      const started = performance.now();
      await sleep(this.#stepMs);
      this.prewarmed.push({ job, jobs });
      return { ms: performance.now() - started, jobs };
    });
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#loaded = null;
    this.#cachedPrompts.clear();
    await this.#queue.catch(() => {});
  }

  #serial<T>(run: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(run, run);
    this.#queue = next.catch(() => {});
    return next;
  }

  #checkOpen(): void {
    if (this.#closed) throw new KinoError("ENGINE_CLOSED", "the engine was closed");
  }

  async #load(spec: ModelSpec, options: Omit<RequestOptions, "signal">): Promise<LoadResult> {
    this.#checkOpen();
    const started = performance.now();
    const model = parseRequest(ModelSpec, spec, "model");
    if (model.device === "cuda" && this.#devices.length === 0) {
      throw new KinoError("DEVICE_UNAVAILABLE", "cuda was asked for but this engine sees no CUDA device", {
        field: "model.device",
        phase: "load",
      });
    }
    this.#loaded = null;
    this.#cachedPrompts.clear();
    const emit = (event: EngineEvent) => options.onEvent?.(event);
    emit({ kind: "phase", phase: "load", state: "start", ms: null });
    const components: LoadResult["components"] = [];
    if (model.source.kind === "checkpoint") {
      const info = await inspectCheckpoint(model.source.path, "model.source.path").catch((err: unknown) => {
        // The engine has one code for every way a checkpoint can be wrong.
        if (err instanceof KinoError) throw new KinoError("BAD_CHECKPOINT", err.message, { field: err.field, phase: "load" });
        throw err;
      });
      for (const name of info.components) {
        emit({ kind: "load", component: name, bytes: 0, totalBytes: 0 });
        components.push({ name, className: name, parameters: 0, bytes: 0 });
      }
    } else {
      for (const name of ["text_encoder", "transformer", "vae"]) {
        components.push({ name, className: name, parameters: 0, bytes: 0 });
      }
    }
    const loadMs = performance.now() - started;
    emit({ kind: "phase", phase: "load", state: "end", ms: loadMs });
    this.#loaded = model;
    return {
      name: model.name,
      device: model.device,
      dtype: model.dtype,
      fps: FAKE_FPS,
      vaeScaleSpatial: FAKE_VAE_SCALE,
      vaeScaleTemporal: 4,
      components,
      loadMs,
    };
  }

  /** Queues jobs to run as one batch (one alone); one promise per job, settled when it ends. */
  #queueJobs(options: readonly RequestOptions[], parse: () => JobSpec[]): Promise<GenerateResult>[] {
    const jobs: FakeJob[] = [];
    const answers = options.map((o) => new Promise<GenerateResult>((resolve, reject) => jobs.push({ options: o, resolve, reject })));
    void this.#serial(() => this.#run(jobs, parse));
    return answers;
  }

  /** The jobs as the engine runs a batch (see the class comment); settles each; never rejects. */
  async #run(all: readonly FakeJob[], parse: () => JobSpec[]): Promise<void> {
    let specs: JobSpec[];
    try {
      this.#checkOpen();
      specs = parse();
      if (this.#loaded === null) throw new KinoError("MODEL_NOT_LOADED", "generate was asked before a model was loaded; send load first");
    } catch (err) {
      for (const j of all) j.reject(err);
      return;
    }
    const device = this.#loaded.device;
    const started = performance.now();
    const live: Array<FakeJob & { readonly job: JobSpec; readonly cache: { promptHits: number; promptMisses: number } }> = [];
    for (const [k, j] of all.entries()) {
      const job = specs[k]!;
      if (j.options.signal?.aborted) j.reject(new KinoError("CANCELLED", "the job was cancelled before it started"));
      else await checkOutputs(job).then(() => live.push({ ...j, job, cache: { promptHits: 0, promptMisses: 0 } }), j.reject);
    }
    const ms: Record<Phase, number> = { load: 0, text_encode: 0, denoise: 0, decode: 0, encode: 0 };
    const phase = (name: Phase, to: readonly FakeJob[], body: () => Promise<void>) => runPhase(name, to, ms, body);
    // Cancellation between steps and before each decode: that job is answered at once, the others go on.
    const dropCancelled = (at: Phase) => {
      for (const j of [...live]) {
        const why = this.#closed ? "the job was cancelled: the engine is shutting down" : j.options.signal?.aborted ? "the job was cancelled" : null;
        if (why === null) continue;
        live.splice(live.indexOf(j), 1);
        j.reject(new KinoError("CANCELLED", why, { phase: at }));
      }
    };
    if (live.length === 0) return;
    await phase("text_encode", live, async () => {
      for (const j of live) {
        for (const text of j.job.guidance > 1 ? [j.job.prompt, j.job.negativePrompt] : [j.job.prompt]) {
          if (this.#cachedPrompts.has(text)) j.cache.promptHits++;
          else {
            j.cache.promptMisses++;
            this.#cachedPrompts.add(text);
            await sleep(1);
          }
        }
      }
    });
    const size = live.length;
    const steps = live[0]!.job.steps;
    // `live` loses cancelled jobs in place, so the phase's end goes to those still in it.
    await phase("denoise", live, async () => {
      for (let i = 1; i <= steps; i++) {
        dropCancelled("denoise");
        if (live.length === 0) return;
        const t0 = performance.now();
        await sleep(this.#stepMs);
        const step: EngineEvent = { kind: "step", i, n: steps, ms: performance.now() - t0, vramBytes: null, ramBytes: process.memoryUsage().rss };
        for (const j of live) {
          j.options.onEvent?.(step);
          const preview = previewAt(j.job, i);
          if (preview !== null) j.options.onEvent?.(preview);
        }
      }
    });
    for (const j of [...live]) {
      dropCancelled("decode");
      if (!live.includes(j)) continue;
      try {
        j.resolve(await this.#finish(j.job, j, ms, started, size, j.cache, device));
      } catch (err) {
        j.reject(err);
      }
    }
  }

  /** One job's decode and encode phases, its outputs and its result. */
  async #finish(
    job: JobSpec,
    to: FakeJob,
    shared: Readonly<Record<Phase, number>>,
    started: number,
    batchSize: number,
    cache: { promptHits: number; promptMisses: number },
    device: ModelSpec["device"],
  ): Promise<GenerateResult> {
    const ms = { ...shared };
    const phase = (name: Phase, body: () => Promise<void>) => runPhase(name, [to], ms, body);
    const fps = job.fps ?? FAKE_FPS;
    const pattern = { width: job.width, height: job.height, frames: job.frames, fps };
    await phase("decode", async () => {
      if (job.output.framesDir !== null) await renderPatternFrames(pattern, job.output.framesDir, this.#ffmpeg);
    });
    await phase("encode", async () => {
      if (job.output.video !== null) await renderPatternVideo(pattern, job.output.video, this.#ffmpeg);
    });
    return {
      frames: job.frames,
      width: job.width,
      height: job.height,
      fps,
      output: { video: job.output.video, framesDir: job.output.framesDir },
      timings: {
        textEncodeMs: ms.text_encode,
        denoiseMs: ms.denoise,
        decodeMs: ms.decode,
        encodeMs: ms.encode,
        totalMs: performance.now() - started,
      },
      secondsPerStep: ms.denoise / job.steps / 1000,
      peakVramBytes: device === "cuda" ? 0 : null,
      peakRamBytes: process.memoryUsage().rss,
      cache,
      batchSize,
    };
  }
}

/** Runs a phase's body between its start and end events (to each of `to`), timing it into `ms`. */
async function runPhase(name: Phase, to: readonly FakeJob[], ms: Record<Phase, number>, body: () => Promise<void>): Promise<void> {
  const emit = (event: EngineEvent) => to.forEach((j) => j.options.onEvent?.(event));
  emit({ kind: "phase", phase: name, state: "start", ms: null });
  const t0 = performance.now();
  await body();
  ms[name] = performance.now() - t0;
  emit({ kind: "phase", phase: name, state: "end", ms: ms[name] });
}

/** A probe answer with made-up rates (an H100-like GPU where there is one); the host's memory is real. */
function fakeProbe(gpu: DeviceInfo | undefined, quick: boolean): ProbeResult {
  const gemm = (m: number, n: number, k: number, flopsPerS: number) => ({ m, n, k, dtype: "bfloat16" as const, seconds: (2 * m * n * k) / flopsPerS, flopsPerS });
  const attention = (heads: number, flopsPerS: number) => ({
    heads,
    tokens: 32760,
    headDim: 128,
    dtype: "bfloat16" as const,
    backend: "cudnn",
    seconds: (4 * heads * 32760 ** 2 * 128) / flopsPerS,
    flopsPerS,
    byBackend: { cudnn: flopsPerS, flash: flopsPerS * 0.9, efficient: flopsPerS * 0.5 },
  });
  const onGpu = gpu !== undefined;
  return {
    device: onGpu ? "cuda" : "cpu",
    index: gpu?.index ?? null,
    name: gpu?.name ?? "fake CPU",
    capability: gpu?.capability ?? null,
    driver: onGpu ? "fake" : null,
    torch: "none",
    cuda: onGpu ? "fake" : null,
    vramTotalBytes: gpu?.totalBytes ?? null,
    vramFreeBytes: gpu?.freeBytes ?? null,
    hostRamBytes: totalmem(),
    hostRamAvailableBytes: freemem(),
    memoryLimitBytes: null,
    memlockBytes: null,
    pinnedLimitBytes: Math.floor(totalmem() / 2),
    h2dBytesPerS: onGpu ? 50e9 : null,
    d2hBytesPerS: onGpu ? 50e9 : null,
    h2dPageableBytesPerS: onGpu ? 20e9 : null,
    transferBytes: onGpu ? 2 ** 30 : null,
    gemm: onGpu ? [gemm(32760, 1536, 1536, 600e12), gemm(32760, 5120, 5120, 750e12)] : [],
    attention: onGpu ? [attention(12, 500e12), attention(40, 550e12)] : [],
    cpuGemm: gemm(512, 4096, 4096, 1e12),
    cpuThreads: Math.max(1, cpus().length),
    quick,
    ms: 0,
  };
}

/** The preview event a job asks for at step `i` (every `preview.every` steps and at the last), or null. */
function previewAt(job: JobSpec, i: number): EngineEvent | null {
  if (job.preview === undefined || (i % job.preview.every !== 0 && i !== job.steps)) return null;
  const width = Math.max(1, Math.floor(job.width / FAKE_VAE_SCALE));
  const height = Math.max(1, Math.floor(job.height / FAKE_VAE_SCALE));
  return { kind: "preview", i, n: job.steps, width, height, png: gradientPng(width, height, i / job.steps).toString("base64") };
}

/** An 8-bit RGB PNG: green across, blue down, red as much as `red` (0..1) says. */
export function gradientPng(width: number, height: number, red: number): Buffer {
  const row = 1 + width * 3;
  const pixels = Buffer.alloc(row * height); // each row: filter type 0 (none), then RGB triples
  const level = (v: number) => Math.round(255 * Math.min(1, Math.max(0, v)));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      pixels.set([level(red), level(x / Math.max(1, width - 1)), level(y / Math.max(1, height - 1))], y * row + 1 + x * 3);
    }
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace
  const chunk = (type: string, data: Buffer) => {
    const body = Buffer.concat([Buffer.from(type, "latin1"), data]);
    const length = Buffer.alloc(4);
    length.writeUInt32BE(data.length);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([length, body, crc]);
  };
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return Buffer.concat([signature, chunk("IHDR", header), chunk("IDAT", deflateSync(pixels)), chunk("IEND", Buffer.alloc(0))]);
}

/** Validates a request body as the real engine does: a mismatch is the control plane's bug. */
function parseRequest<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw new KinoError("BAD_REQUEST", `the ${what} does not match the protocol: ${parsed.error.message}`);
  return parsed.data;
}

/** The real engine refuses outputs it cannot write before doing any work; so does the fake. */
async function checkOutputs(job: JobSpec): Promise<void> {
  const writableDir = (dir: string) => access(dir, constants.W_OK).then(() => true, () => false);
  const { video, framesDir } = job.output;
  if (video !== null) {
    const isDir = await stat(video).then((s) => s.isDirectory(), () => false);
    if (isDir || !(await writableDir(dirname(video)))) {
      throw new KinoError("OUTPUT_UNWRITABLE", `cannot write the video to ${video}: ${isDir ? "it is a folder" : "its folder does not exist or is not writable"}`, {
        field: "job.output.video",
      });
    }
  }
  if (framesDir !== null) {
    const entries = await readdir(framesDir).catch(() => null);
    if ((entries !== null && entries.length > 0) || !(await writableDir(dirname(framesDir)))) {
      throw new KinoError("OUTPUT_UNWRITABLE", `cannot write frames into ${framesDir}: ${entries?.length ? "it is not empty" : "its parent folder does not exist or is not writable"}`, {
        field: "job.output.framesDir",
      });
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
