/**
 * What the planner learns from runs: each generation that executed a plan reports its measured peak
 * device memory per phase; the control plane appends (model, hardware, request, placement, phase,
 * predicted, measured) to a small JSON-lines log in kino's cache, and before planning reads back a
 * correction factor per phase for the same model and GPU: the median of measured / predicted over the
 * most recent runs, clamped to [0.8, 1.5] so one odd run cannot swing a plan. The planner multiplies
 * each phase's predicted peak by it (PlanBudget.corrections).
 *
 * The log is append-only, one JSON object per line, so concurrent writers (a server and a CLI run)
 * never corrupt each other's lines; unreadable lines are skipped.
 */
import { appendFile, mkdir, readFile } from "node:fs/promises";
import { dirname } from "node:path";
import { PLAN_PHASES, type PhaseCorrections, type Plan, type PlanPhase } from "./plan.ts";

export interface PeakRecord {
  readonly at: string;
  readonly model: string;
  readonly hardware: string;
  readonly request: { readonly width: number; readonly height: number; readonly frames: number };
  /** The plan's placements, decode mode and CFG, as one string (what makes two runs the same plan). */
  readonly plan: string;
  readonly phase: PlanPhase;
  /** The planner's prediction before any learned correction (what the factor multiplies). */
  readonly predicted: number;
  readonly measured: number;
}

/** Runs per (model, hardware) that a correction looks back over. */
export const LOOKBACK = 20;
export const CLAMP: readonly [number, number] = [0.8, 1.5];

export function planKey(plan: Plan): string {
  const p = plan.placement;
  const show = (x: Plan["placement"]["transformer"]) =>
    x.kind === "streamed" ? `streamed:${x.residentBlocks}:${x.prefetch}${x.source === "disk" ? ":disk" : ""}` : x.kind;
  const decode = plan.vaeDecode.mode === "full" ? "full" : `tiled:${plan.vaeDecode.tile}`;
  return `te=${show(p.textEncoder)} tr=${show(p.transformer)} vae=${show(p.vae)} decode=${decode} cfg=${plan.cfg}`;
}

/** The records of one run: a phase the engine reported a peak for, beside the plan's prediction. */
export function peakRecords(plan: Plan, measured: Partial<Record<PlanPhase, number>>, now: Date = new Date()): PeakRecord[] {
  const out: PeakRecord[] = [];
  for (const phase of PLAN_PHASES) {
    const value = measured[phase];
    if (value === undefined || !(value > 0)) continue;
    out.push({
      at: now.toISOString(),
      model: plan.model,
      hardware: plan.hardware,
      request: { width: plan.request.width, height: plan.request.height, frames: plan.request.frames },
      plan: planKey(plan),
      phase,
      predicted: plan.predicted.phases[phase].vram / (plan.corrections[phase] ?? 1),
      measured: value,
    });
  }
  return out;
}

/** The median of a non-empty series. */
export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/**
 * The correction per phase for `model` on `hardware`: the median measured/predicted ratio over its
 * last LOOKBACK records (predictions stored before correction), clamped. Phases without records are
 * absent (no correction).
 */
export function corrections(records: readonly PeakRecord[], model: string, hardware: string): PhaseCorrections {
  const out: Partial<Record<PlanPhase, number>> = {};
  for (const phase of PLAN_PHASES) {
    const mine = records.filter((r) => r.model === model && r.hardware === hardware && r.phase === phase && r.predicted > 0).slice(-LOOKBACK);
    if (mine.length === 0) continue;
    const factor = median(mine.map((r) => r.measured / r.predicted));
    out[phase] = Math.min(CLAMP[1], Math.max(CLAMP[0], factor));
  }
  return out;
}

/** The peak log in a file (JSON lines). */
export class PeakLog {
  readonly path: string;

  constructor(path: string) {
    this.path = path;
  }

  async read(): Promise<PeakRecord[]> {
    let text: string;
    try {
      text = await readFile(this.path, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw err;
    }
    const out: PeakRecord[] = [];
    for (const line of text.split("\n")) {
      if (line.trim() === "") continue;
      try {
        const r = JSON.parse(line) as PeakRecord;
        if (typeof r.model === "string" && typeof r.measured === "number" && typeof r.predicted === "number" && PLAN_PHASES.includes(r.phase)) out.push(r);
      } catch {
        // A torn or foreign line: skipped (the log is advisory).
      }
    }
    return out;
  }

  async append(records: readonly PeakRecord[]): Promise<void> {
    if (records.length === 0) return;
    await mkdir(dirname(this.path), { recursive: true });
    // One write per run: lines under PIPE_BUF-sized appends do not interleave between processes.
    await appendFile(this.path, records.map((r) => JSON.stringify(r)).join("\n") + "\n");
  }
}

/**
 * The peak log held in memory for a long-running process (`kino serve`), whose planning is
 * synchronous: `attach` reads the log once, `correctionsFor` answers from memory, `record` adds a
 * run's peaks to memory and appends them to the log (the same file `kino generate` uses, so both
 * learn from each other's runs). Detached, it learns in memory only.
 */
export class LearnedPeaks {
  #records: PeakRecord[] = [];
  #log: PeakLog | null = null;

  /** Reads `log` (a torn or missing file is no records) and persists what is recorded from now on. */
  async attach(log: PeakLog): Promise<void> {
    this.#records = await log.read().catch(() => []);
    this.#log = log;
  }

  detach(): void {
    this.#records = [];
    this.#log = null;
  }

  correctionsFor(model: string, hardware: string): PhaseCorrections {
    return corrections(this.#records, model, hardware);
  }

  /** A run's measured peaks against the plan it executed; the log write's failure is reported, the memory keeps them. */
  async record(plan: Plan, measured: Partial<Record<PlanPhase, number>>): Promise<void> {
    const records = peakRecords(plan, measured);
    this.#records.push(...records);
    await this.#log?.append(records);
  }
}

/** This process's learned peaks (kino serve attaches the peak log at start). */
export const learnedPeaks = new LearnedPeaks();
