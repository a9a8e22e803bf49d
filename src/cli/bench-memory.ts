/** `kino bench-memory`: one random-weight model under several VRAM budgets, each planned, run and compared with its prediction. */
import { Command } from "commander";
import {
  memoryBenchReport,
  memoryBenchSpec,
  readMemoryRaw,
  recordMemoryBench,
  runMemoryBench,
  type MemoryBenchReport,
} from "../api/memory-bench.ts";
import type { CliContext } from "./context.ts";
import { integerFlag } from "./flags.ts";
import { bytes, formatTable } from "./format.ts";
import { addRandomRunOptions, randomRun, type RandomRunFlags } from "./job-flags.ts";
import { addMeasureOptions, runMeasurement, runtimeFlags, type MeasureFlags } from "./measure.ts";

interface BenchMemoryFlags extends RandomRunFlags, MeasureFlags {
  budgets: string;
  levels?: string;
  ram?: string;
  gpu: string;
  timedSteps?: string;
  resident: boolean;
  compile: boolean;
}

export function benchMemoryCommand(ctx: CliContext): Command {
  const command = new Command("bench-memory").description(
    "run a random-weight model under each VRAM budget as the planner plans it, and compare every phase's peak and time with the prediction",
  );
  addRandomRunOptions(command, "untimed denoising steps per budget", "1")
    .option("--budgets <list>", "comma-separated VRAM budgets", "8GB,12GB,16GB,24GB,48GB,80GB")
    .option("--levels <list>", "comma-separated memory-level presets (0..3) to run as well, e.g. 0,1,2,3")
    .option("--gpu <profile>", "the hardware profile to plan for", "h100-80gb")
    .option("--ram <size>", "plan the budgets under this host RAM, e.g. 8GB (below the weights, the transformer streams from disk)")
    .option("--timed-steps <n>", "timed denoising steps per budget (median reported)", "2")
    .option("--no-resident", "skip the all-resident reference case")
    .option("--no-compile", "without regional torch.compile (on by default on cuda)");
  return addMeasureOptions(command, "kino_engine.memory_bench").action((flags: BenchMemoryFlags) =>
    runMeasurement(ctx, flags, {
      name: "bench-memory",
      logPrefix: "[memory-bench]",
      spec: (provenance) =>
        memoryBenchSpec(
          {
            ...randomRun(flags),
            budgets: flags.budgets.split(",").map((b) => b.trim()).filter((b) => b !== ""),
            levels: (flags.levels ?? "").split(",").filter((l) => l.trim() !== "").map((l) => integerFlag(l.trim(), "levels")!),
            gpu: flags.gpu,
            ram: flags.ram,
            timedSteps: integerFlag(flags.timedSteps, "timedSteps"),
            resident: flags.resident,
            ...runtimeFlags(ctx),
          },
          provenance,
        ),
      run: runMemoryBench,
      readRaw: readMemoryRaw,
      report: memoryBenchReport,
      record: recordMemoryBench,
      format: formatMemoryBench,
    }),
  );
}

/** One row per budget: placement, peak predicted/measured, s/step predicted/measured, vs resident. */
export function formatMemoryBench(report: MemoryBenchReport): string {
  const { spec } = report;
  const pct = (r: number | null) => (r === null ? "—" : `${r >= 1 ? "+" : ""}${((r - 1) * 100).toFixed(1)}%`);
  const b = (v: number | null) => (v === null ? "—" : bytes(v));
  const s = (v: number | null) => (v === null ? "—" : `${v.toFixed(3)} s`);
  const head = ["budget", "peak predicted", "peak measured", "Δ", "s/step predicted", "s/step measured", "Δ", "gen Δ", "vs resident", "pinned/planned", "RAM predicted", "RAM measured", "OOM"];
  const rows = report.comparisons.map((c) => [
    c.label,
    b(c.peakVram.predicted),
    b(c.peakVram.measured),
    pct(c.peakVram.ratio),
    s(c.secondsPerStep.predicted),
    s(c.secondsPerStep.measured),
    pct(c.secondsPerStep.ratio),
    pct(c.generationSeconds.ratio),
    c.stepVsResident === null ? "—" : `${c.stepVsResident.toFixed(3)}×`,
    c.pinnedOverPlanned === null ? "—" : `${c.pinnedOverPlanned.toFixed(3)}×`,
    b(c.peakRam.predicted),
    b(c.peakRam.measured),
    c.oom ?? "no",
  ]);
  const placements = report.comparisons.map((c) => `  ${c.label}: ${c.placement}\n`);
  const refused = spec.infeasible.map((i) => `  ${i.label}: refused by the planner: ${i.message}\n`);
  const same = spec.duplicates.map((d) => `  ${d.label}: the same plan as ${d.sameAs} (not run again)\n`);
  return [
    `${spec.model.name} (random weights) ${spec.job.width}x${spec.job.height}x${spec.job.frames}, planned for ${spec.hardware}, measured on ${report.raw.environment.gpu ?? "cpu"}\n`,
    formatTable(head, rows),
    ...placements,
    ...refused,
    ...same,
  ].join("");
}
