/**
 * `kino bench`: kino's Wan loop against diffusers' WanPipeline on the same components, in one engine
 * process on one GPU, and the report that records it (GPU, versions, command, commit).
 *
 * The control plane decides what to measure (a catalog architecture with random weights, the job,
 * the warm-ups) and where the record goes; the engine's `kino_engine.bench` tool measures. The two
 * halves can also run apart: `specOnly` gives the spec to run with
 * `python -m kino_engine.bench --spec FILE` on a machine without Node, and `fromRaw` records its answer.
 */
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { z } from "zod";
import { findCatalogModel, catalogIds, WAN21_1_3B_ID } from "../catalog/models.ts";
import type { KinoConfig } from "../config/config.ts";
import { runEngineTool, type ToolOptions } from "../engine/tools.ts";
import { KinoError } from "../errors.ts";
import { JobSpec, ModelSpec } from "../protocol/engine.ts";
import { H100_80GB } from "../planner/hardware.ts";
import { modelManifest } from "../planner/manifest.ts";
import { plan } from "../planner/plan.ts";
import { DTYPE_NAMES, parseSize } from "./generate-options.ts";

export const BENCH_PROMPT = "A cat walks on the grass, realistic";

/** The model and job options of a random-weight run, shared by `kino bench` and `kino profile`. */
export const RandomRunOptions = z.object({
  /** A catalog id with an architecture. @default wan2.1-t2v-1.3b */
  model: z.string().default(WAN21_1_3B_ID),
  /** @default the model's (832x480) */
  size: z.string().optional(),
  /** @default the model's (81) */
  frames: z.number().int().positive().optional(),
  /** @default the model's (50) */
  steps: z.number().int().positive().optional(),
  /** @default the model's (5) */
  guidance: z.number().nonnegative().optional(),
  /** @default the model's (3) */
  shift: z.number().positive().optional(),
  /** @default 42 */
  seed: z.number().int().nonnegative().default(42),
  /** @default "A cat walks on the grass, realistic" */
  prompt: z.string().default(BENCH_PROMPT),
  /** @default cuda */
  device: z.enum(["cuda", "cpu"]).default("cuda"),
  /** @default bf16 */
  dtype: z.enum(["bf16", "fp16", "fp32"]).default("bf16"),
});
export type RandomRunOptions = z.input<typeof RandomRunOptions>;

export const BenchOptions = RandomRunOptions.extend({
  /** Steps of the untimed warm-up generation of each system. @default 2 */
  warmupSteps: z.number().int().positive().default(2),
  /** Timed generations of each system (the summary takes medians). @default 1 */
  generations: z.number().int().positive().default(1),
  /** Measure diffusers' WanPipeline as it comes beside kino. @default true */
  reference: z.boolean().default(true),
  /** Also measure diffusers at its best settings (regional compile, fastest attention). @default true on cuda */
  compiledReference: z.boolean().optional(),
  /** kino's hot path: attention backend ("auto" measures once per GPU and shape). @default auto */
  attention: z.enum(["auto", "default", "cudnn", "flash", "efficient", "math"]).default("auto"),
  /** kino's hot path: classifier-free guidance as one batch-2 forward or two. @default auto (the planner's choice for an H100, all resident) */
  cfg: z.enum(["auto", "batched", "sequential"]).default("auto"),
  /** kino's hot path: regional torch.compile of the transformer blocks. @default true on cuda */
  compile: z.boolean().optional(),
  /** Where the attention choice and the inductor cache persist; null persists nothing. */
  cacheDir: z.string().nullable().default(null),
});
export type BenchOptions = z.input<typeof BenchOptions>;

/** A job without outputs: what the engine's measuring tools run. */
export const RunJob = JobSpec.omit({ output: true });
export type RunJob = z.infer<typeof RunJob>;

/** Provenance, carried with a spec so a result measured elsewhere is still attributable. */
export const ProvenanceSchema = z.object({ command: z.string(), commit: z.string().nullable(), dirty: z.boolean().nullable() });

/** What the engine's bench tool takes. */
export const BenchSpec = z.object({
  model: ModelSpec,
  job: RunJob,
  warmupSteps: z.number().int().positive(),
  generations: z.number().int().positive(),
  /** The reference systems, measured in this order around kino (see engine/kino_engine/bench.py). */
  references: z.array(z.enum(["diffusers", "diffusers-compiled"])),
  kinoRuntime: z.object({
    cfg: z.enum(["auto", "batched", "sequential"]),
    attention: z.enum(["auto", "default", "cudnn", "flash", "efficient", "math"]),
    compile: z.boolean(),
  }),
  cacheDir: z.string().nullable(),
  provenance: ProvenanceSchema,
});
export type BenchSpec = z.infer<typeof BenchSpec>;

const Stat = z.looseObject({ n: z.number(), medianS: z.number().optional() });
const Run = z.looseObject({
  wallS: z.number(),
  phasesS: z.record(z.string(), z.number()),
  forward: Stat,
  /** Batch of the model's forwards (2 when CFG runs batched). */
  forwardBatch: z.number().int().positive().optional(),
  step: Stat,
  peakVramBytes: z.number().nullable(),
});
const Compared = z.object({
  kino: z.number().nullable(),
  diffusers: z.number().nullable(),
  ratio: z.number().nullable(),
  diffusersCompiled: z.number().nullable().optional(),
  ratioCompiled: z.number().nullable().optional(),
  /** The floor (GEMMs + attention alone, measured in the same run) where the bench measured one. */
  floor: z.number().optional(),
  kinoOverFloor: z.number().nullable().optional(),
  diffusersOverFloor: z.number().nullable().optional(),
  diffusersCompiledOverFloor: z.number().nullable().optional(),
});

/** What the engine's bench tool answers (the parts the report relies on; the rest is kept as is). */
export const BenchRaw = z.looseObject({
  environment: z.looseObject({ torch: z.string(), diffusers: z.string(), gpu: z.string().optional() }),
  spec: BenchSpec,
  loadS: z.number(),
  videoTokens: z.number(),
  runs: z.looseObject({ kino: z.array(Run), diffusers: z.array(Run).optional(), "diffusers-compiled": z.array(Run).optional() }),
  summary: z.object({ forwardS: Compared, stepS: Compared, generationS: Compared, peakVramBytes: Compared }),
});
export type BenchRaw = z.infer<typeof BenchRaw>;

export interface BenchReport extends BenchRaw {
  readonly kind: "kino-bench/v1";
  readonly recordedAt: string;
}

/** Provenance of a spec: the command line and the commit it was made at. */
export interface Provenance {
  readonly command: string;
  readonly commit: string | null;
  readonly dirty: boolean | null;
}

/** `input` parsed by `schema`; the first problem is an INVALID_ARGUMENT naming its option (the CLI shows it as the flag). */
export function parseOptions<S extends z.ZodType>(schema: S, input: unknown): z.output<S> {
  const parsed = schema.safeParse(input);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  throw new KinoError("INVALID_ARGUMENT", issue?.message ?? "invalid options", { field: issue?.path.map(String).join(".") || null });
}

/** The engine spec for `options`: the catalog architecture with random weights and the model's defaults. */
export function benchSpec(input: BenchOptions, provenance: Provenance): BenchSpec {
  const o = parseOptions(BenchOptions, input);
  const run = randomRun(o);
  return BenchSpec.parse({
    ...run,
    warmupSteps: o.warmupSteps,
    generations: o.generations,
    references: [
      ...(o.reference ? (["diffusers"] as const) : []),
      ...((o.compiledReference ?? o.device === "cuda") ? (["diffusers-compiled"] as const) : []),
    ],
    kinoRuntime: { cfg: o.cfg === "auto" ? plannedCfg(run) : o.cfg, attention: o.attention, compile: o.compile ?? o.device === "cuda" },
    cacheDir: o.cacheDir,
    provenance,
  });
}

/**
 * Guidance as `kino generate` would run it on an H100 with everything resident: the planner's
 * choice (batched where one sample leaves the GPU underused, two forwards where it is saturated).
 * Without guidance, or when the planner refuses the shape, "auto" is left to the engine (batched).
 */
function plannedCfg({ model, job }: ReturnType<typeof randomRun>): "auto" | "batched" | "sequential" {
  if (model.source.kind !== "random" || job.guidance <= 1) return "auto";
  try {
    const chosen = plan(modelManifest(model.name, model.source.architecture), H100_80GB, job).cfg;
    return chosen === "off" ? "auto" : chosen;
  } catch (error) {
    if (error instanceof KinoError) return "auto";
    throw error;
  }
}

/** The model (a catalog architecture with random weights) and the job (the model's defaults under the options). */
export function randomRun(input: RandomRunOptions): { model: ModelSpec; job: RunJob } {
  const o = parseOptions(RandomRunOptions, input);
  const model = findCatalogModel(o.model);
  if (model === undefined) {
    throw new KinoError("UNKNOWN_MODEL", `"${o.model}" is not in the catalog; known: ${catalogIds().join(", ")}`, { field: "model" });
  }
  if (model.architecture === null) {
    throw new KinoError("INVALID_ARGUMENT", `"${o.model}" has no full-size architecture to benchmark; use ${WAN21_1_3B_ID} or another hub model`, { field: "model" });
  }
  const d = model.defaults;
  const { width, height } = o.size !== undefined ? parseSize(o.size, model.shape) : { width: d.width, height: d.height };
  const frames = o.frames ?? d.frames;
  if ((frames - 1) % model.shape.temporalMultiple !== 0) {
    throw new KinoError("INVALID_ARGUMENT", `must be of the form ${model.shape.temporalMultiple}k+1 (e.g. 81); got ${frames}`, { field: "frames" });
  }
  return {
    model: {
      name: model.id,
      source: { kind: "random", architecture: model.architecture, seed: 0 },
      device: o.device,
      dtype: DTYPE_NAMES[o.dtype],
    },
    job: {
      prompt: o.prompt,
      negativePrompt: d.negativePrompt,
      width,
      height,
      frames,
      steps: o.steps ?? d.steps,
      guidance: o.guidance ?? d.guidance,
      shift: o.shift ?? d.shift,
      seed: o.seed,
      fps: d.fps,
    },
  };
}

/** The commit of the repository kino runs from, and whether the tree differs from it; nulls outside git. */
export async function gitProvenance(repoRoot: string): Promise<{ commit: string | null; dirty: boolean | null }> {
  const git = promisify(execFile);
  try {
    const { stdout: head } = await git("git", ["rev-parse", "HEAD"], { cwd: repoRoot });
    const { stdout: status } = await git("git", ["status", "--porcelain", "--untracked-files=no"], { cwd: repoRoot });
    return { commit: head.trim(), dirty: status.trim() !== "" };
  } catch {
    return { commit: null, dirty: null };
  }
}

/** Runs the engine's bench tool on this machine and returns its raw answer. */
export async function runBench(config: KinoConfig, spec: BenchSpec, options: ToolOptions = {}): Promise<BenchRaw> {
  return runSpecTool(config, "kino_engine.bench", spec, BenchRaw, "kino bench", options);
}

/** Reads a raw answer saved from `python -m kino_engine.bench` (the whole last line, or its result). */
export function readRaw(path: string): Promise<BenchRaw> {
  return readToolAnswer(path, BenchRaw, "kino bench");
}

/**
 * Runs one of the engine's measuring tools (`python -m <module> --spec FILE`) on a spec written to a
 * temporary file, and checks its answer against `schema` (`kind` names it in errors: "kino bench").
 */
export async function runSpecTool<S extends z.ZodType>(
  config: KinoConfig,
  module: string,
  spec: unknown,
  schema: S,
  kind: string,
  options: ToolOptions = {},
): Promise<z.output<S>> {
  const scratch = await mkdtemp(join(tmpdir(), "kino-tool-"));
  try {
    const specPath = join(scratch, "spec.json");
    await writeFile(specPath, JSON.stringify(spec));
    const answer = await runEngineTool(config, ["--spec", specPath], { ...options, module });
    return parseToolResult(answer.result, schema, kind, `the engine's ${module}`);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

/** A tool's answer saved to a file (its whole last line, or just the result), checked against `schema`. */
export async function readToolAnswer<S extends z.ZodType>(path: string, schema: S, kind: string): Promise<z.output<S>> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(path, "utf8"));
  } catch (err) {
    throw new KinoError("INVALID_ARGUMENT", `cannot read ${path} as JSON: ${(err as Error).message}`, { field: "from" });
  }
  const body = (parsed as { result?: unknown; ok?: unknown }).ok === true ? (parsed as { result: unknown }).result : parsed;
  return parseToolResult(body, schema, kind, path);
}

function parseToolResult<S extends z.ZodType>(value: unknown, schema: S, kind: string, what: string): z.output<S> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new KinoError("INVALID_ARGUMENT", `${what} is not a ${kind} result: ${issue?.path.join(".")}: ${issue?.message}`, { field: "from" });
  }
  return parsed.data;
}

export function benchReport(raw: BenchRaw, now: Date = new Date()): BenchReport {
  return { kind: "kino-bench/v1", recordedAt: now.toISOString(), ...raw };
}

/** A file name that sorts by date and says what was measured: 2026-11-22-h100-wan2.1-t2v-1.3b-832x480x81.json */
export function reportFileName(report: BenchReport): string {
  const gpu = gpuSlug(report.environment.gpu);
  const { width, height, frames, steps } = report.spec.job;
  const commit = report.spec.provenance.commit?.slice(0, 7);
  return `${report.recordedAt.slice(0, 10)}-${gpu}-${report.spec.model.name}-${width}x${height}x${frames}-${steps}steps${commit ? `-${commit}` : ""}.json`;
}

/** Writes the report into `dir` (temporary name, then rename); returns its path. Never replaces a record. */
export async function recordBench(report: BenchReport, dir: string): Promise<string> {
  return writeRecord(report, dir, reportFileName(report));
}

/** Writes `report` as `dir/name` (temporary name, then rename); refuses to replace an existing record. */
export async function writeRecord(report: unknown, dir: string, name: string): Promise<string> {
  await mkdir(dir, { recursive: true });
  const path = join(dir, name);
  if (await stat(path).then(() => true, () => false)) {
    throw new KinoError("INVALID_ARGUMENT", `${path} already exists: a recorded measurement is never replaced; move it away first or record into another folder`, { field: "record" });
  }
  const partial = `${path}.partial`;
  await writeFile(partial, JSON.stringify(report, null, 2) + "\n");
  await rename(partial, path);
  return path;
}

/** The GPU's short name for record file names: "NVIDIA H100 80GB HBM3" → "h100". */
export function gpuSlug(gpu: string | undefined): string {
  return (gpu ?? "cpu").toLowerCase().replace(/nvidia|hbm3e?|\d+gb/g, "").trim().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
}
