/**
 * `kino bench-serve`: the serving figures of a warm engine (issue 5): how long a request waits for
 * its first denoising step, and what batching two same-shape requests gains over running them one
 * after the other. The engine's `kino_engine.serving_bench` tool measures them through a real worker
 * process and its protocol, as the server drives it; this module decides what to measure (a catalog
 * architecture with random weights, compiled on CUDA, everything resident, the text encoder
 * included) and judges the figures against issue 5's targets. Like `kino bench`, the halves can run
 * apart (`--spec-only`, `--from`) for a GPU machine without Node.
 */
import { z } from "zod";
import type { KinoConfig } from "../config/config.ts";
import type { ToolOptions } from "../engine/tools.ts";
import { ModelSpec, type MemorySpec } from "../protocol/engine.ts";
import { gpuSlug, parseOptions, ProvenanceSchema, randomRun, RandomRunOptions, readToolAnswer, RunJob, runSpecTool, writeRecord, type Provenance } from "./bench.ts";

/**
 * The default job: 1 200 video tokens (320x192x17 → 20x12 patches × 5 latent frames), a size where one
 * request of the 1.3B leaves an H100 underused, so two batched have room to gain (1.37× the
 * throughput of two in sequence there); at 480x272x33 (4 590 tokens) one request already fills it
 * and batching gained 1.04× (docs/benchmarks.md, commit c06db8f).
 */
export const SERVE_BENCH_JOB = { size: "320x192", frames: 17, steps: 20 } as const;

/** Issue 5's targets: request → first denoising step, and batched over sequential throughput. */
export const SERVE_TARGETS = { ttfsMs: 250, throughputRatio: 1.3 } as const;

export const ServeBenchOptions = RandomRunOptions.extend({
  /** Time-to-first-step requests of each kind (new prompt, cached prompt). @default 5 */
  ttfsRuns: z.number().int().positive().default(5),
  /** Timed rounds of batched and of sequential (the report takes medians). @default 2 */
  rounds: z.number().int().positive().default(2),
  /** Same-shape jobs per round: one generate_batch of them against as many generates. @default 2 */
  batch: z.number().int().min(2).default(2),
  /** Steps of each warm-up generation and batch; null: the job's. @default null */
  warmupSteps: z.number().int().positive().nullable().default(null),
  /** Regional torch.compile, paid by the warm-ups. @default true on cuda */
  compile: z.boolean().optional(),
  /** Where the attention choice and the inductor cache persist; null persists nothing. */
  cacheDir: z.string().nullable().default(null),
});
export type ServeBenchOptions = z.input<typeof ServeBenchOptions>;

/** What the engine's serving bench tool takes (see engine/kino_engine/serving_bench.py). */
export const ServeBenchSpec = z.object({
  model: ModelSpec,
  /** Steps of each warm-up generation and batch; null (or absent, as in the first record): the job's. */
  warmupSteps: z.number().int().positive().nullable().default(null),
  ttfs: z.object({ job: RunJob, runs: z.number().int().positive() }),
  throughput: z.array(z.object({ job: RunJob, rounds: z.number().int().positive(), batch: z.number().int().min(2) })),
  provenance: ProvenanceSchema,
});
export type ServeBenchSpec = z.infer<typeof ServeBenchSpec>;

/** A measured series and its median and range (the unit is the field's). */
export const Stats = z.object({ values: z.array(z.number()), median: z.number(), min: z.number(), max: z.number() });
export type Stats = z.infer<typeof Stats>;

const FirstStep = z.looseObject({
  ttfsMs: Stats,
  toDenoiseStartMs: Stats,
  requestMs: Stats,
  /** The prompt cache over the requests (absent in the first record). */
  promptCache: z.object({ hits: z.number(), misses: z.number() }).optional(),
});

const Throughput = z.looseObject({
  job: z.object({ width: z.number(), height: z.number(), frames: z.number(), steps: z.number(), guidance: z.number() }),
  jobs: z.number().int(),
  batchedS: Stats,
  sequentialS: Stats,
  batchedJobsPerS: z.number(),
  sequentialJobsPerS: z.number(),
  throughputRatio: z.number(),
  /** Each form's denoising step times (absent in the first record). */
  stepMs: z.object({ batched: Stats, sequential: Stats }).optional(),
});
export type ThroughputFigures = z.infer<typeof Throughput>;

/** What the engine's serving bench tool answers (the parts the report relies on; the rest is kept as is). */
export const ServeBenchRaw = z.looseObject({
  environment: z.looseObject({ torch: z.string(), gpu: z.string().optional() }),
  spec: ServeBenchSpec,
  loadS: z.number(),
  timeToFirstStep: z.object({ newPrompt: FirstStep, cachedPrompt: FirstStep }),
  throughput: z.array(Throughput),
  /** How the worker ended (absent in the first record). */
  worker: z.object({ pid: z.number().int(), exitStatus: z.number().int() }).optional(),
});
export type ServeBenchRaw = z.infer<typeof ServeBenchRaw>;

export interface ServeTargets {
  /** Both kinds' median against 250 ms. */
  readonly ttfsMs: { readonly target: number; readonly newPrompt: number; readonly cachedPrompt: number; readonly met: boolean };
  /** The best throughput case (the size where one request leaves the GPU most underused) against 1.3×; null without one. */
  readonly throughputRatio: { readonly target: number; readonly measured: number | null; readonly met: boolean | null };
}

export interface ServeBenchReport extends ServeBenchRaw {
  readonly kind: "kino-serving-bench/v1";
  readonly recordedAt: string;
  readonly targets: ServeTargets;
}

/** Everything resident, the text encoder included: a warm engine, as served. */
const ALL_RESIDENT: MemorySpec = { textEncoder: { kind: "resident" }, transformer: { kind: "resident" }, vae: { kind: "resident" }, vramBudget: null };

/** The engine's spec: one job shape for both measurements, SERVE_BENCH_JOB unless the options name one. */
export function serveBenchSpec(input: ServeBenchOptions, provenance: Provenance): ServeBenchSpec {
  const o = parseOptions(ServeBenchOptions, input);
  const { model, job } = randomRun({
    ...o,
    size: o.size ?? SERVE_BENCH_JOB.size,
    frames: o.frames ?? SERVE_BENCH_JOB.frames,
    steps: o.steps ?? SERVE_BENCH_JOB.steps,
  });
  return ServeBenchSpec.parse({
    model: {
      ...model,
      runtime: { cfg: "auto", attention: "auto", compile: o.compile ?? o.device === "cuda", cacheDir: o.cacheDir },
      memory: ALL_RESIDENT,
    },
    warmupSteps: o.warmupSteps,
    ttfs: { job, runs: o.ttfsRuns },
    throughput: [{ job, rounds: o.rounds, batch: o.batch }],
    provenance,
  });
}

/** The figures against issue 5's targets. */
export function serveTargets(raw: ServeBenchRaw): ServeTargets {
  const newPrompt = raw.timeToFirstStep.newPrompt.ttfsMs.median;
  const cachedPrompt = raw.timeToFirstStep.cachedPrompt.ttfsMs.median;
  const ratios = raw.throughput.map((t) => t.throughputRatio);
  const best = ratios.length === 0 ? null : Math.max(...ratios);
  return {
    ttfsMs: { target: SERVE_TARGETS.ttfsMs, newPrompt, cachedPrompt, met: Math.max(newPrompt, cachedPrompt) <= SERVE_TARGETS.ttfsMs },
    throughputRatio: { target: SERVE_TARGETS.throughputRatio, measured: best, met: best === null ? null : best >= SERVE_TARGETS.throughputRatio },
  };
}

export function serveBenchReport(raw: ServeBenchRaw, now: Date = new Date()): ServeBenchReport {
  // A record read back (--from) carries its own kind and date: the new ones win.
  return { ...raw, kind: "kino-serving-bench/v1", recordedAt: now.toISOString(), targets: serveTargets(raw) };
}

/** Runs the engine's serving bench tool on this machine (it starts its own worker). */
export function runServeBench(config: KinoConfig, spec: ServeBenchSpec, options: ToolOptions = {}): Promise<ServeBenchRaw> {
  return runSpecTool(config, "kino_engine.serving_bench", spec, ServeBenchRaw, "kino serving bench", options);
}

/** A raw answer saved from `python -m kino_engine.serving_bench` (the whole last line, or its result), or a record. */
export function readServeRaw(path: string): Promise<ServeBenchRaw> {
  return readToolAnswer(path, ServeBenchRaw, "kino serving bench");
}

/**
 * 2026-11-22-h100-wan2.1-t2v-1.3b-320x192x17-20steps-serving-abc1234.json (the first throughput
 * case's job, else the time-to-first-step one); never replaces a record.
 */
export function serveRecordName(report: ServeBenchReport): string {
  const { width, height, frames, steps } = report.spec.throughput[0]?.job ?? report.spec.ttfs.job;
  const commit = report.spec.provenance.commit?.slice(0, 7);
  return `${report.recordedAt.slice(0, 10)}-${gpuSlug(report.environment.gpu)}-${report.spec.model.name}-${width}x${height}x${frames}-${steps}steps-serving${commit ? `-${commit}` : ""}.json`;
}

export function recordServeBench(report: ServeBenchReport, dir: string): Promise<string> {
  return writeRecord(report, dir, serveRecordName(report));
}
