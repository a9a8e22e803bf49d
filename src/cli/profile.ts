/** `kino profile`: one warm generation under torch.profiler; a Chrome trace and a digest table. */
import { join, resolve } from "node:path";
import { Command, Option } from "commander";
import { gitProvenance } from "../api/bench.ts";
import { profileSpec, runProfile, type ProfileOptions, type ProfileRaw } from "../api/profile.ts";
import type { CliContext } from "./context.ts";
import { formatTable } from "./format.ts";
import { addRandomRunOptions, commandLine, randomRun, type RandomRunFlags } from "./job-flags.ts";

interface ProfileFlags extends RandomRunFlags {
  compile?: boolean;
  attention?: ProfileOptions["attention"];
  trace: string;
  json?: boolean;
}

/** Where the trace goes unless --trace says otherwise (in the current folder, like a profiler's report). */
export const DEFAULT_TRACE = "kino-profile.trace.json";

export function profileCommand(ctx: CliContext): Command {
  const command = new Command("profile").description("profile one warm generation (random weights): a Chrome trace and where the time goes");
  return addRandomRunOptions(command, "steps of the untimed warm-up generation", "1")
    .option("--compile", "profile the compiled hot path (regional torch.compile, compiled during the warm-up)")
    .addOption(new Option("--attention <name>", "attention backend (auto measures once per GPU and shape)").choices(["auto", "default", "cudnn", "flash", "efficient", "math"]))
    .option("--trace <file>", "where to write the Chrome trace (open in Perfetto or chrome://tracing)", DEFAULT_TRACE)
    .option("--json", "print the digest as JSON on stdout")
    .action(async (flags: ProfileFlags) => {
      const options: ProfileOptions = {
        ...randomRun(flags),
        compile: flags.compile ?? false,
        attention: flags.attention,
        cacheDir: join(ctx.config.cache, "runtime"),
      };
      const spec = profileSpec(options, { command: commandLine(ctx.argv, "profile"), ...(await gitProvenance(ctx.config.repoRoot)) });
      const raw = await runProfile(ctx.config, spec, resolve(ctx.cwd, flags.trace), {
        signal: ctx.signal,
        logger: ctx.logger,
        onStderrLine: (line) => line.startsWith("[profile]") && ctx.io.stderr(line + "\n"),
      });
      ctx.io[flags.json ? "stderr" : "stdout"](formatProfileDigest(raw));
      if (flags.json) ctx.io.stdout(JSON.stringify(raw) + "\n");
    });
}

/** The digest as tables: time by category, top kernels, and each step after the first. */
export function formatProfileDigest(raw: ProfileRaw): string {
  const { digest: d, spec } = raw;
  const job = spec.job;
  const ms = (v: number | null | undefined) => (v === null || v === undefined ? "—" : `${v.toFixed(2)} ms`);
  const n = (v: number | null) => (v === null ? "—" : String(v));
  const c = d.categories;
  const out: string[] = [
    `${spec.model.name} (random weights, ${spec.model.dtype}) ${job.width}x${job.height}x${job.frames}, ${job.steps} steps, guidance ${job.guidance}\n`,
    `${raw.environment.gpu ?? "cpu"} · torch ${raw.environment.torch} · prompt cache ${d.promptCache.hits} hit(s), ${d.promptCache.misses} miss(es)\n`,
    "\n",
    formatTable(
      ["time by category", ""],
      [
        ["wall (one warm generation)", ms(c.wallMs)],
        ["  text encode / denoise / decode", `${ms(d.phasesMs.text_encode)} / ${ms(d.phasesMs.denoise)} / ${ms(d.phasesMs.decode)}`],
        ["GPU kernels", ms(c.gpuKernelMs)],
        ["memcpy H2D / D2H / D2D", c.memcpyMs === null ? "—" : `${ms(c.memcpyMs.h2d)} / ${ms(c.memcpyMs.d2h)} / ${ms(c.memcpyMs.d2d)}`],
        ["memset", ms(c.memsetMs)],
        ["CPU ops (top level)", ms(c.cpuOpsMs)],
        ["GPU idle (wall − device busy)", ms(c.gpuIdleMs)],
      ],
    ),
  ];
  if (d.topKernels !== null && d.topKernels.length > 0) {
    out.push(
      "\n",
      formatTable(
        ["top kernels", "calls", "total", "% GPU"],
        d.topKernels.map((k) => [k.name.length > 80 ? `${k.name.slice(0, 77)}...` : k.name, String(k.calls), ms(k.totalMs), `${k.percent.toFixed(1)}%`]),
      ),
    );
  }
  out.push(
    "\n",
    formatTable(
      ["step", "time", "host syncs", "scalar reads", "allocs", "cudaMalloc", "retries"],
      d.steps.map((s) => [
        String(s.step),
        ms(s.ms),
        n(s.hostSyncs),
        String(s.scalarReads),
        n(s.allocations?.requests ?? null),
        n(s.allocations?.cudaMallocs ?? null),
        n(s.allocations?.retries ?? null),
      ]),
    ),
    `${d.stepsProfiled} steps profiled (the first, with its one-time work, not listed)`,
    raw.trace === null ? "\n" : `; trace: ${raw.trace}\n`,
  );
  return out.join("");
}
