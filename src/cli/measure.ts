/**
 * What the measuring commands (`bench`, `bench-memory`, `bench-serve`) share: the engine tool runs
 * here, or only its spec is printed for a GPU machine without Node (`--spec-only`), or a result
 * measured there is read back (`--from`); then the report is printed and, with `--record`, written.
 */
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { gitProvenance, type Provenance } from "../api/bench.ts";
import type { KinoConfig } from "../config/config.ts";
import type { ToolOptions } from "../engine/tools.ts";
import type { CliContext } from "./context.ts";
import { commandLine } from "./job-flags.ts";

export interface MeasureFlags {
  specOnly?: boolean;
  from?: string;
  record?: string;
  json?: boolean;
}

/** Adds --spec-only, --from, --record and --json for the engine tool `module` (kino_engine.bench). */
export function addMeasureOptions(command: Command, module: string): Command {
  return command
    .option("--spec-only", `print the engine spec (for python -m ${module} --spec FILE) and stop`)
    .option("--from <raw.json>", `record a result measured elsewhere by python -m ${module}`)
    .option("--record <dir>", "write the report as JSON into this folder (e.g. docs/benchmarks)")
    .option("--json", "print the report as JSON on stdout");
}

/**
 * The engine runtime options the measuring commands take from the command line: compile unless
 * --no-compile (commander sets a negatable flag to true when absent, so only the explicit flag
 * overrides the device's default), and kino's runtime cache folder.
 */
export function runtimeFlags(ctx: CliContext): { compile: false | undefined; cacheDir: string } {
  return { compile: ctx.argv.includes("--no-compile") ? false : undefined, cacheDir: join(ctx.config.cache, "runtime") };
}

/** One measuring command's parts, from its spec to its printed report. */
export interface Measurement<Spec, Raw, Report> {
  /** The command's name, for the provenance's command line. */
  readonly name: string;
  /** The prefix of the tool's progress lines on stderr, shown as they come ("[bench]"). */
  readonly logPrefix: string;
  spec(provenance: Provenance): Spec;
  run(config: KinoConfig, spec: Spec, options: ToolOptions): Promise<Raw>;
  readRaw(path: string): Promise<Raw>;
  report(raw: Raw): Report;
  record(report: Report, dir: string): Promise<string>;
  format(report: Report): string;
}

/** Runs (or prints the spec of, or reads back) one measurement and reports it as the flags say. */
export async function runMeasurement<Spec, Raw, Report>(ctx: CliContext, flags: MeasureFlags, m: Measurement<Spec, Raw, Report>): Promise<void> {
  let raw: Raw;
  if (flags.from !== undefined) {
    raw = await m.readRaw(resolve(ctx.cwd, flags.from));
  } else {
    const spec = m.spec({ command: commandLine(ctx.argv, m.name), ...(await gitProvenance(ctx.config.repoRoot)) });
    if (flags.specOnly) return ctx.io.stdout(JSON.stringify(spec) + "\n");
    raw = await m.run(ctx.config, spec, {
      signal: ctx.signal,
      logger: ctx.logger,
      onStderrLine: (line) => line.startsWith(m.logPrefix) && ctx.io.stderr(line + "\n"),
    });
  }
  const report = m.report(raw);
  if (flags.record !== undefined) {
    const path = await m.record(report, resolve(ctx.cwd, flags.record));
    ctx.io.stderr(`kino: recorded ${path}\n`);
  }
  // With --json the table goes to stderr, so stdout is the report alone.
  ctx.io[flags.json ? "stderr" : "stdout"](m.format(report));
  if (flags.json) ctx.io.stdout(JSON.stringify(report) + "\n");
}
