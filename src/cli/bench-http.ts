/** `kino bench-http`: a running `kino serve` timed over HTTP, request → first denoising step (issue 5's figure with its HTTP hop). */
import { Command } from "commander";
import { httpBenchReport, httpBenchSpec, readHttpRaw, recordHttpBench, runHttpBench, type HttpBenchReport, type HttpStats } from "../api/serve-http-bench.ts";
import type { CliContext } from "./context.ts";
import { integerFlag } from "./flags.ts";
import { formatTable } from "./format.ts";
import { runMeasurement, type MeasureFlags } from "./measure.ts";

interface BenchHttpFlags extends MeasureFlags {
  url: string;
  model: string;
  randomWeights?: boolean;
  size?: string;
  frames?: string;
  steps: string;
  runs: string;
}

const HELP = `
Start the server first (kino serve), on this machine: the figures compare the server's clock (when
it recorded each job event) with this client's. A warm-up job loads the model; then --runs requests
with a new prompt and as many with the warm-up's (cached) prompt, one at a time, each followed over
SSE to its end. Reported per kind (medians, ms):
  request → step 1   before the POST → the server recorded the engine's first step event
  engine             the job's text encode + its first step, as the engine timed them
  control plane      the difference: HTTP, validation and admission, the job store, the scheduler,
                     the engine protocol's hop and the engine's bookkeeping around the two
The engine-level figure (kino bench-serve) plus this control-plane time is a request's whole wait.
API key: $KINO_API_KEY.
`;

export function benchHttpCommand(ctx: CliContext): Command {
  return new Command("bench-http")
    .description("time a running kino serve over HTTP: request → first denoising step, the engine's part and the control plane's")
    .option("--url <url>", "the server", "http://127.0.0.1:8188")
    .option("--model <id>", "the model the jobs ask for", "auto")
    .option("--random-weights", "the catalog architecture with random weights")
    .option("--size <WxH>", "job size (default: the model's)")
    .option("--frames <n>", "frames, 4k+1 (default: the model's)")
    .option("--steps <n>", "steps of each job (step 1 is what is timed)", "2")
    .option("--runs <n>", "requests with a new prompt, and as many with a cached one", "5")
    .option("--from <raw.json>", "report a result recorded before")
    .option("--record <dir>", "write the report as JSON into this folder (e.g. docs/benchmarks)")
    .option("--json", "print the report as JSON on stdout")
    .addHelpText("after", HELP)
    .action((flags: BenchHttpFlags) =>
      runMeasurement(ctx, flags, {
        name: "bench-http",
        logPrefix: "[bench-http]",
        spec: (provenance) =>
          httpBenchSpec(
            {
              url: flags.url,
              apiKey: process.env.KINO_API_KEY || undefined,
              model: flags.model,
              randomWeights: flags.randomWeights ?? false,
              size: flags.size,
              frames: integerFlag(flags.frames, "frames"),
              steps: integerFlag(flags.steps, "steps"),
              runs: integerFlag(flags.runs, "runs"),
            },
            provenance,
          ),
        run: (_config, spec) => runHttpBench(spec, (line) => ctx.io.stderr(line + "\n")),
        readRaw: readHttpRaw,
        report: httpBenchReport,
        record: recordHttpBench,
        format: formatHttpBench,
      }),
    );
}

export function formatHttpBench(report: HttpBenchReport): string {
  const ms = (s: HttpStats | null) => (s === null ? "—" : `${s.median.toFixed(1)} ms`);
  const rows = (["newPrompt", "cachedPrompt"] as const).map((kind) => {
    const f = report.figures[kind];
    return [kind === "newPrompt" ? "new prompt" : "cached prompt", ms(f.requestToFirstStepMs), ms(f.engineMs), ms(f.controlPlaneMs), ms(f.postMs), ms(f.toStartedMs), ms(f.sseDeliveryMs)];
  });
  const { spec, server } = report;
  return [
    `${server.model} on ${server.device} via ${spec.url}: ${spec.runs} requests of each kind, ${spec.steps} steps${spec.size === undefined ? "" : `, ${spec.size}`}${spec.frames === undefined ? "" : `x${spec.frames}`} (medians)\n`,
    formatTable(["", "request → step 1", "engine", "control plane", "POST", "→ started", "SSE delivery"], rows),
  ].join("");
}
