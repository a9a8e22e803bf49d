/** `kino bench`: measure kino against diffusers in one run on this machine's GPU, and record it. */
import { Command, Option } from "commander";
import {
  benchReport,
  benchSpec,
  readRaw,
  recordBench,
  runBench,
  type BenchOptions,
  type BenchReport,
} from "../api/bench.ts";
import type { CliContext } from "./context.ts";
import { integerFlag } from "./flags.ts";
import { bytes, formatTable } from "./format.ts";
import { addRandomRunOptions, randomRun, type RandomRunFlags } from "./job-flags.ts";
import { addMeasureOptions, runMeasurement, runtimeFlags, type MeasureFlags } from "./measure.ts";

interface BenchFlags extends RandomRunFlags, MeasureFlags {
  generations?: string;
  reference: boolean;
  compiledReference: boolean;
  attention?: string;
  cfg?: string;
  compile: boolean;
}

export function benchCommand(ctx: CliContext): Command {
  const command = new Command("bench").description("time kino against diffusers' WanPipeline on the same random-weight model, in one run");
  addRandomRunOptions(command, "steps of each system's untimed warm-up generation", "2")
    .option("--generations <n>", "timed generations per system", "1")
    .option("--no-reference", "do not measure diffusers as it comes")
    .option("--no-compiled-reference", "do not measure diffusers with regional compile and the fastest attention")
    .addOption(new Option("--attention <name>", "kino's attention backend (auto measures once per GPU and shape)").choices(["auto", "default", "cudnn", "flash", "efficient", "math"]))
    .addOption(new Option("--cfg <mode>", "kino's guidance: one batch-2 forward or two").choices(["auto", "batched", "sequential"]))
    .option("--no-compile", "kino without regional torch.compile (on by default on cuda)");
  return addMeasureOptions(command, "kino_engine.bench").action((flags: BenchFlags) =>
    runMeasurement(ctx, flags, {
      name: "bench",
      logPrefix: "[bench]",
      spec: (provenance) => {
        const options: BenchOptions = {
          ...randomRun(flags),
          generations: integerFlag(flags.generations, "generations"),
          reference: flags.reference,
          // commander sets negatable flags to true when absent: only an explicit --no-… overrides the device default.
          compiledReference: ctx.argv.includes("--no-compiled-reference") ? false : undefined,
          attention: flags.attention as BenchOptions["attention"],
          cfg: flags.cfg as BenchOptions["cfg"],
          ...runtimeFlags(ctx),
        };
        return benchSpec(options, provenance);
      },
      run: runBench,
      readRaw,
      report: benchReport,
      record: recordBench,
      format: formatBenchSummary,
    }),
  );
}

/** A table of kino vs diffusers with ratios (< 1: kino takes less). */
export function formatBenchSummary(report: BenchReport): string {
  const { environment: env, spec, summary } = report;
  const job = spec.job;
  const s = (v: number | null) => (v === null ? "—" : `${v.toFixed(3)} s`);
  const b = (v: number | null) => (v === null ? "—" : bytes(v));
  const r = (v: number | null) => (v === null ? "—" : `${v.toFixed(3)}×`);
  const row = (label: string, e: (typeof summary)["stepS"], f: (v: number | null) => string): string[] => [
    label, f(e.kino), f(e.diffusers), f(e.diffusersCompiled ?? null), r(e.ratio), r(e.ratioCompiled ?? null),
  ];
  const rows: string[][] = [
    row("per forward, batch 1 (median)", summary.forwardS, s),
    row("per step (median)", summary.stepS, s),
    row("per generation (warm)", summary.generationS, s),
    row("peak VRAM", summary.peakVramBytes, b),
  ];
  const head = ["", "kino", "diffusers", "diffusers compiled", "kino/diffusers", "kino/compiled"];
  for (const [label, entry] of [["forward", summary.forwardS], ["step", summary.stepS]] as const) {
    if (entry.floor === undefined) continue;
    rows.push([`${label} / floor (${s(entry.floor)})`, r(entry.kinoOverFloor ?? null), r(entry.diffusersOverFloor ?? null), r(entry.diffusersCompiledOverFloor ?? null), "", ""]);
  }
  return [
    `${spec.model.name} (random weights, ${spec.model.dtype}) ${job.width}x${job.height}x${job.frames}, ${job.steps} steps, guidance ${job.guidance}\n`,
    `${env.gpu ?? "cpu"} · torch ${env.torch} · diffusers ${env.diffusers} · ${report.videoTokens} video tokens\n`,
    formatTable(head, rows),
  ].join("");
}
