/** `kino bench-serve`: a warm engine's time to first step and batched-vs-sequential throughput (issue 5's figures). */
import { Command } from "commander";
import {
  readServeRaw,
  recordServeBench,
  runServeBench,
  SERVE_BENCH_JOB,
  serveBenchReport,
  serveBenchSpec,
  type ServeBenchReport,
  type Stats,
} from "../api/serve-bench.ts";
import type { CliContext } from "./context.ts";
import { integerFlag } from "./flags.ts";
import { formatTable } from "./format.ts";
import { addRandomRunOptions, randomRun, type RandomRunFlags } from "./job-flags.ts";
import { addMeasureOptions, runMeasurement, runtimeFlags, type MeasureFlags } from "./measure.ts";

interface BenchServeFlags extends RandomRunFlags, MeasureFlags {
  ttfsRuns?: string;
  rounds?: string;
  batch?: string;
  compile: boolean;
}

const HELP = `
The engine is started as the server starts it (its protocol on fd 3), loads the model (random
weights; compiled on cuda, everything resident, the text encoder included) and is warmed up by one
generation at the job's shape; then:
  time to first step   --ttfs-runs requests with new prompts (the text encoder runs) and as many with
                       a cached one: request written → step 1 began on the GPU (target ≤ 250 ms)
  batched/sequential   --batch jobs as one generate_batch against as many generates, --rounds times
                       after a warm-up of both (target: ≥ 1.3× the throughput)
The default job, ${SERVE_BENCH_JOB.size}x${SERVE_BENCH_JOB.frames} with ${SERVE_BENCH_JOB.steps} steps (1 200 video tokens), is a size where one request of
the 1.3B leaves an H100 underused, which is where batching can pay: at 480x272x33 one request already
fills it (batching measured 1.04× there).

On a GPU machine without Node: kino bench-serve --spec-only > spec.json here, there
  PYTHONPATH=engine python -m kino_engine.serving_bench --spec spec.json > raw.json
and back here: kino bench-serve --from raw.json --record docs/benchmarks
`;

export function benchServeCommand(ctx: CliContext): Command {
  const command = new Command("bench-serve").description(
    "time a warm engine from request to first denoising step, and two same-shape jobs batched against sequential",
  );
  addRandomRunOptions(command, "steps of each warm-up generation and batch (default: the job's)", undefined, {
    size: SERVE_BENCH_JOB.size,
    frames: String(SERVE_BENCH_JOB.frames),
    steps: String(SERVE_BENCH_JOB.steps),
  })
    .option("--ttfs-runs <n>", "time-to-first-step requests with a new prompt, and as many with a cached one", "5")
    .option("--rounds <n>", "timed rounds of batched and of sequential (medians reported)", "2")
    .option("--batch <n>", "same-shape jobs per round", "2")
    .option("--no-compile", "without regional torch.compile (on by default on cuda)")
    .addHelpText("after", HELP);
  return addMeasureOptions(command, "kino_engine.serving_bench").action((flags: BenchServeFlags) =>
    runMeasurement(ctx, flags, {
      name: "bench-serve",
      logPrefix: "[serving-bench]",
      spec: (provenance) =>
        serveBenchSpec(
          {
            ...randomRun(flags),
            ttfsRuns: integerFlag(flags.ttfsRuns, "ttfsRuns"),
            rounds: integerFlag(flags.rounds, "rounds"),
            batch: integerFlag(flags.batch, "batch"),
            ...runtimeFlags(ctx),
          },
          provenance,
        ),
      run: runServeBench,
      readRaw: readServeRaw,
      report: serveBenchReport,
      record: recordServeBench,
      format: formatServeBench,
    }),
  );
}

/** Two tables: time to first step (new and cached prompt), and each throughput case, batched against sequential; the targets met or not. */
export function formatServeBench(report: ServeBenchReport): string {
  const { environment: env, spec, targets } = report;
  const ms = (v: number) => `${v.toFixed(1)} ms`;
  const range = (s: Stats) => `${ms(s.min)}–${ms(s.max)}`;
  const verdict = (met: boolean | null) => (met === null ? "—" : met ? "met" : "NOT met");
  const runtime = spec.model.runtime;
  const t = spec.ttfs.job;
  const ttfsRows = (["newPrompt", "cachedPrompt"] as const).map((kind) => {
    const f = report.timeToFirstStep[kind];
    const cache = f.promptCache === undefined ? "" : `${f.promptCache.hits} hits, ${f.promptCache.misses} misses`;
    return [kind === "newPrompt" ? "new prompt (text encoder runs)" : "cached prompt", ms(f.ttfsMs.median), range(f.ttfsMs), ms(f.toDenoiseStartMs.median), cache];
  });
  const out = [
    `${spec.model.name} (random weights, ${spec.model.dtype}${runtime?.compile ? ", compiled" : ""}) on ${env.gpu ?? "cpu"} · torch ${env.torch} · loaded in ${report.loadS.toFixed(1)} s\n`,
    `\ntime to first step: ${t.width}x${t.height}x${t.frames}, ${t.steps} steps, ${spec.ttfs.runs} requests each\n`,
    formatTable(["", "median", "range", "→ denoise start", "prompt cache"], ttfsRows),
    `target ≤ ${targets.ttfsMs.target} ms: ${verdict(targets.ttfsMs.met)}\n`,
  ];
  for (const c of report.throughput) {
    const s = (v: number) => `${v.toFixed(2)} s`;
    const step = (form: "batched" | "sequential") => (c.stepMs === undefined ? "—" : ms(c.stepMs[form].median));
    out.push(
      `\n${c.jobs} jobs ${c.job.width}x${c.job.height}x${c.job.frames}, ${c.job.steps} steps, guidance ${c.job.guidance}: batched against sequential\n`,
      formatTable(
        ["", "wall (median)", "range", "jobs/s", "step (median)"],
        [
          ["batched (one generate_batch)", s(c.batchedS.median), `${s(c.batchedS.min)}–${s(c.batchedS.max)}`, c.batchedJobsPerS.toFixed(2), step("batched")],
          [`sequential (${c.jobs} generates)`, s(c.sequentialS.median), `${s(c.sequentialS.min)}–${s(c.sequentialS.max)}`, c.sequentialJobsPerS.toFixed(2), step("sequential")],
        ],
      ),
      `throughput batched / sequential: ${c.throughputRatio.toFixed(2)}× (target ≥ ${targets.throughputRatio.target}×: ${verdict(c.throughputRatio >= targets.throughputRatio.target)})\n`,
    );
  }
  return out.join("");
}
