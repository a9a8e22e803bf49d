/**
 * `kino bench-memory`: one random-weight model under a list of VRAM budgets (and a host RAM budget:
 * below the weights, the transformer streams from a scratch file on disk, as it would stream from a
 * checkpoint's files). The planner plans each budget here; the engine's `kino_engine.memory_bench`
 * tool loads the model once, executes each plan
 * (placements and the VRAM cap enforced in its process), and measures every phase; the report sets
 * each measurement beside its prediction. Like `kino bench`, the halves can run apart (`specOnly`,
 * `fromRaw`) for a GPU machine without Node.
 */
import { z } from "zod";
import { findCatalogModel } from "../catalog/models.ts";
import type { KinoConfig } from "../config/config.ts";
import type { ToolOptions } from "../engine/tools.ts";
import { KinoError, toKinoError } from "../errors.ts";
import { MemorySpec, ModelSpec } from "../protocol/engine.ts";
import { jobFieldsOf, memorySpecOf } from "../planner/execute.ts";
import { findHardwarePreset, HARDWARE_PRESETS } from "../planner/hardware.ts";
import { modelManifest } from "../planner/manifest.ts";
import { plan, type MemoryLevel, type Plan } from "../planner/plan.ts";
import { gpuSlug, parseOptions, ProvenanceSchema, randomRun, RandomRunOptions, readToolAnswer, RunJob, runSpecTool, writeRecord, type Provenance } from "./bench.ts";
import { parseByteSize } from "./plan.ts";

export const MemoryBenchOptions = RandomRunOptions.extend({
  /** VRAM budgets such as "8GB" (GiB); each is planned and run. */
  budgets: z.array(z.string()).default([]),
  /** Memory-level presets (0..3) to run as well, each planned at that level on the whole card. */
  levels: z.array(z.number().int().min(0).max(3)).default([]),
  /** The hardware profile the planner plans for. @default h100-80gb */
  gpu: z.string().default("h100-80gb"),
  /**
   * The host RAM budget (e.g. "8GB") the budgets' cases are planned under: below the weights, the transformer
   * streams from disk. @default the profile's RAM
   */
  ram: z.string().optional(),
  /** Untimed denoising steps per case (compile, first copies). @default 1 */
  warmupSteps: z.number().int().nonnegative().default(1),
  /** Timed denoising steps per case (the report takes the median). @default 2 */
  timedSteps: z.number().int().positive().default(2),
  /** Regional compile, as a served model runs. @default true on cuda */
  compile: z.boolean().optional(),
  /** Run everything resident first, with no cap: the reference of the per-step ratios. @default true */
  resident: z.boolean().default(true),
  cacheDir: z.string().nullable().default(null),
});
export type MemoryBenchOptions = z.input<typeof MemoryBenchOptions>;

const Predicted = z.object({
  peakVram: z.number(),
  peakRam: z.number(),
  seconds: z.number(),
  secondsPerStep: z.number(),
  pinnedBytes: z.number(),
  phases: z.record(z.string(), z.object({ vram: z.number(), seconds: z.number() })),
});

export const MemoryCase = z.object({
  label: z.string(),
  memory: MemorySpec,
  vaeDecode: RunJob.shape.vaeDecode,
  cfg: RunJob.shape.cfg,
  predicted: Predicted.nullable(),
  reasons: z.array(z.string()),
});
export type MemoryCase = z.infer<typeof MemoryCase>;

export const MemoryBenchSpec = z.object({
  model: ModelSpec,
  job: RunJob,
  warmupSteps: z.number().int().nonnegative(),
  timedSteps: z.number().int().positive(),
  hardware: z.string(),
  cases: z.array(MemoryCase),
  /** Budgets the planner refused (INFEASIBLE), with its message: nothing is run for them. */
  infeasible: z.array(z.object({ label: z.string(), message: z.string() })),
  /** Budgets whose plan is an earlier case's (same placements, decode and CFG; another cap): not run again. */
  duplicates: z.array(z.object({ label: z.string(), sameAs: z.string() })),
  provenance: ProvenanceSchema,
});
export type MemoryBenchSpec = z.infer<typeof MemoryBenchSpec>;

const Phase = z.looseObject({ seconds: z.number(), peakVramBytes: z.number().nullable(), secondsPerStep: z.number().nullable().optional() });
const MeasuredCase = z.looseObject({
  label: z.string(),
  phases: z.record(z.string(), Phase),
  pinnedBytes: z.number(),
  peakVramBytes: z.number().nullable(),
  peakRamBytes: z.number(),
  oom: z.object({ phase: z.string(), message: z.string() }).nullable(),
  latentsMaxAbsDiffVsFirst: z.number().optional(),
});
export const MemoryBenchRaw = z.looseObject({
  environment: z.looseObject({ torch: z.string(), gpu: z.string().optional() }),
  /** The spec it ran, echoed back so that a result measured elsewhere carries its predictions. */
  spec: MemoryBenchSpec,
  loadS: z.number(),
  cases: z.array(MeasuredCase),
});
export type MemoryBenchRaw = z.infer<typeof MemoryBenchRaw>;

export interface CaseComparison {
  readonly label: string;
  readonly placement: string;
  readonly oom: string | null;
  readonly peakVram: { predicted: number | null; measured: number | null; ratio: number | null; withinTenPercent: boolean | null };
  readonly budgetBytes: number | null;
  readonly underBudget: boolean | null;
  /** The process's peak RSS in the case against the plan's host RAM (a disk plan's: the staging ring, not the blocks). */
  readonly peakRam: { predicted: number | null; measured: number | null; ratio: number | null };
  readonly secondsPerStep: { predicted: number | null; measured: number | null; ratio: number | null };
  /** Text encode + all the job's steps at the measured rate + decode, against the prediction. */
  readonly generationSeconds: { predicted: number | null; measured: number | null; ratio: number | null; withinTwentyPercent: boolean | null };
  /** Measured seconds per step over the resident case's. */
  readonly stepVsResident: number | null;
  /** Pinned host bytes over the bytes the plan streams or swaps. */
  readonly pinnedOverPlanned: number | null;
  readonly latentsMaxAbsDiffVsFirst: number | null;
}

export interface MemoryBenchReport {
  readonly kind: "kino-memory-bench/v1";
  readonly recordedAt: string;
  readonly spec: MemoryBenchSpec;
  readonly raw: MemoryBenchRaw;
  readonly comparisons: readonly CaseComparison[];
}

function describe(m: MemorySpec): string {
  const p = (s: MemorySpec["transformer"]) =>
    s.kind === "streamed" ? `streamed${s.source === "disk" ? " from disk" : ""}(${s.residentBlocks} resident, prefetch ${s.prefetch})` : s.kind;
  return `te ${p(m.textEncoder)} · transformer ${p(m.transformer)} · vae ${p(m.vae)}`;
}

function predictedOf(p: Plan): z.infer<typeof Predicted> {
  return {
    peakVram: p.predicted.peakVram,
    peakRam: p.predicted.peakRam,
    seconds: p.predicted.seconds,
    secondsPerStep: p.predicted.secondsPerStep,
    pinnedBytes: p.pinnedBytes,
    phases: p.predicted.phases,
  };
}

/** Plans each budget and builds the engine's spec (and the list of refused budgets). */
export function memoryBenchSpec(input: MemoryBenchOptions, provenance: Provenance): MemoryBenchSpec {
  const o = parseOptions(MemoryBenchOptions, input);
  if (o.budgets.length === 0 && o.levels.length === 0) {
    throw new KinoError("INVALID_ARGUMENT", "give at least one VRAM budget (--budgets) or memory level (--levels)", { field: "budgets" });
  }
  const run = randomRun(o);
  const entry = findCatalogModel(o.model)!;
  const hardware = findHardwarePreset(o.gpu);
  if (hardware === undefined) throw new KinoError("INVALID_ARGUMENT", `unknown GPU profile "${o.gpu}"; known: ${HARDWARE_PRESETS.map((h) => h.name).join(", ")}`, { field: "gpu" });
  const manifest = modelManifest(entry.id, entry.architecture!);
  const request = { width: run.job.width, height: run.job.height, frames: run.job.frames, steps: run.job.steps, guidance: run.job.guidance };
  const cases: MemoryCase[] = [];
  const infeasible: { label: string; message: string }[] = [];
  const duplicates: { label: string; sameAs: string }[] = [];
  if (o.resident) {
    const all = plan(manifest, hardware, request, { memoryLevel: 0 });
    cases.push({ label: "resident", memory: { ...memorySpecOf(all), vramBudget: null }, ...jobFieldsOf(all), predicted: predictedOf(all), reasons: [...all.reasons] });
  }
  for (const level of o.levels) {
    const p = plan(manifest, hardware, request, { memoryLevel: level as MemoryLevel });
    cases.push({ label: `level ${level}`, memory: { ...memorySpecOf(p), vramBudget: null }, ...jobFieldsOf(p), predicted: predictedOf(p), reasons: [...p.reasons] });
  }
  const ram = o.ram === undefined ? undefined : parseByteSize(o.ram, "ram");
  for (const label of o.budgets) {
    const vram = parseByteSize(label, "budgets");
    try {
      const p = plan(manifest, hardware, request, { vram, ram });
      const memory = memorySpecOf(p);
      const fields = jobFieldsOf(p);
      // A budget whose plan repeats an earlier case's measures the same run again (only the cap differs,
      // and the budgets run smallest first in practice): skip it.
      const same = cases.find((c) => samePlan(c, memory, fields));
      if (same !== undefined) {
        duplicates.push({ label, sameAs: same.label });
        continue;
      }
      cases.push({ label, memory, ...fields, predicted: predictedOf(p), reasons: [...p.reasons] });
    } catch (err) {
      const e = toKinoError(err);
      if (e.code !== "INFEASIBLE") throw e;
      infeasible.push({ label, message: e.message });
    }
  }
  const device = o.device;
  const model: ModelSpec = {
    ...run.model,
    runtime: { cfg: "auto", attention: "auto", compile: o.compile ?? device === "cuda", cacheDir: o.cacheDir },
  };
  return MemoryBenchSpec.parse({ model, job: run.job, warmupSteps: o.warmupSteps, timedSteps: o.timedSteps, hardware: hardware.name, cases, infeasible, duplicates, provenance });
}

function samePlan(c: MemoryCase, memory: MemorySpec, fields: ReturnType<typeof jobFieldsOf>): boolean {
  const key = (m: MemorySpec, f: Pick<MemoryCase, "vaeDecode" | "cfg">) =>
    JSON.stringify([m.textEncoder, m.transformer, m.vae, f.vaeDecode ?? { mode: "full" }, f.cfg ?? null]);
  return key(c.memory, c) === key(memory, fields);
}

const ratio = (a: number | null | undefined, b: number | null | undefined) => (a == null || b == null || b === 0 ? null : a / b);

/** Each measured case beside its prediction. */
export function compareMemoryBench(spec: MemoryBenchSpec, raw: MemoryBenchRaw): CaseComparison[] {
  const steps = spec.job.steps;
  const byLabel = new Map(raw.cases.map((c) => [c.label, c]));
  const residentStep = byLabel.get("resident")?.phases["denoise"]?.secondsPerStep ?? null;
  return spec.cases.map((c) => {
    const m = byLabel.get(c.label);
    const p = c.predicted;
    const denoise = m?.phases["denoise"];
    const perStep = denoise?.secondsPerStep ?? null;
    const stepS = (denoise?.["stepS"] as number[] | undefined) ?? [];
    // Time in the denoise phase outside the steps themselves (a swapped transformer's copy in).
    const outsideSteps = denoise === undefined ? 0 : Math.max(0, denoise.seconds - stepS.reduce((a, b) => a + b, 0));
    const generation =
      m === undefined || m.oom !== null || perStep === null
        ? null
        : (m.phases["textEncode"]?.seconds ?? 0) + steps * perStep + outsideSteps + (m.phases["decode"]?.seconds ?? 0);
    const peakRatio = ratio(m?.peakVramBytes, p?.peakVram);
    const genRatio = ratio(generation, p?.seconds);
    const budget = c.memory.vramBudget;
    return {
      label: c.label,
      placement: describe(c.memory) + (c.vaeDecode?.mode === "tiled" ? ` · decode tiled ${c.vaeDecode.tile}` : "") + (c.cfg ? ` · cfg ${c.cfg}` : ""),
      oom: m?.oom ? `${m.oom.phase}: ${m.oom.message}` : m === undefined ? "not measured" : null,
      peakVram: { predicted: p?.peakVram ?? null, measured: m?.peakVramBytes ?? null, ratio: peakRatio, withinTenPercent: peakRatio === null ? null : Math.abs(peakRatio - 1) <= 0.1 },
      budgetBytes: budget,
      underBudget: budget === null || m?.peakVramBytes == null ? null : m.peakVramBytes <= budget,
      peakRam: { predicted: p?.peakRam ?? null, measured: m?.peakRamBytes ?? null, ratio: ratio(m?.peakRamBytes, p?.peakRam) },
      secondsPerStep: { predicted: p?.secondsPerStep ?? null, measured: perStep, ratio: ratio(perStep, p?.secondsPerStep) },
      generationSeconds: { predicted: p?.seconds ?? null, measured: generation, ratio: genRatio, withinTwentyPercent: genRatio === null ? null : Math.abs(genRatio - 1) <= 0.2 },
      stepVsResident: c.label === "resident" ? null : ratio(perStep, residentStep),
      pinnedOverPlanned: p === null || p.pinnedBytes === 0 || m === undefined ? null : m.pinnedBytes / p.pinnedBytes,
      latentsMaxAbsDiffVsFirst: m?.latentsMaxAbsDiffVsFirst ?? null,
    };
  });
}

export function memoryBenchReport(raw: MemoryBenchRaw, now: Date = new Date()): MemoryBenchReport {
  const { spec } = raw;
  return { kind: "kino-memory-bench/v1", recordedAt: now.toISOString(), spec, raw, comparisons: compareMemoryBench(spec, raw) };
}

/** Runs the engine's memory bench tool on this machine. */
export function runMemoryBench(config: KinoConfig, spec: MemoryBenchSpec, options: ToolOptions = {}): Promise<MemoryBenchRaw> {
  return runSpecTool(config, "kino_engine.memory_bench", spec, MemoryBenchRaw, "kino memory bench", options);
}

/** A raw answer saved from `python -m kino_engine.memory_bench` (the whole last line, or its result). */
export function readMemoryRaw(path: string): Promise<MemoryBenchRaw> {
  return readToolAnswer(path, MemoryBenchRaw, "kino memory bench");
}

/** 2026-11-22-h100-wan2.1-t2v-14b-832x480x81-memory-abc1234.json; never replaces a record. */
export async function recordMemoryBench(report: MemoryBenchReport, dir: string): Promise<string> {
  const { width, height, frames } = report.spec.job;
  const commit = report.spec.provenance.commit?.slice(0, 7);
  const name = `${report.recordedAt.slice(0, 10)}-${gpuSlug(report.raw.environment.gpu)}-${report.spec.model.name}-${width}x${height}x${frames}-memory${commit ? `-${commit}` : ""}.json`;
  return writeRecord(report, dir, name);
}
