/**
 * The kino CLI: builds the commands, runs one, and turns whatever it throws into one clear message
 * and an exit status (2: bad request, 1: failure, 130: cancelled). The one place that calls
 * process.exit, when run as the program; tests call `runCli` in-process with their own context.
 *
 * To add a command: write src/cli/<name>.ts exporting `<name>Command(ctx): Command`, and list it in
 * COMMANDS below.
 */
import { readFileSync, realpathSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Command, CommanderError } from "commander";
import { REPO_ROOT, resolveConfig } from "../config/config.ts";
import { SubprocessEngine } from "../engine/subprocess.ts";
import { makeTinyCheckpoint, pullCheckpoint } from "../engine/tools.ts";
import { toKinoError } from "../errors.ts";
import { createLogger } from "../log.ts";
import type { CliContext } from "./context.ts";
import { benchCommand } from "./bench.ts";
import { benchMemoryCommand } from "./bench-memory.ts";
import { benchHttpCommand } from "./bench-http.ts";
import { benchServeCommand } from "./bench-serve.ts";
import { doctorCommand } from "./doctor.ts";
import { formatError } from "./format.ts";
import { generateCommand } from "./generate.ts";
import { modelsCommand } from "./models.ts";
import { planCommand } from "./plan.ts";
import { probeCommand } from "./probe.ts";
import { profileCommand } from "./profile.ts";
import { quantizeCommand } from "./quantize.ts";
import { serveCommand } from "./serve.ts";

/** Every command, one file each. */
const COMMANDS: ReadonlyArray<(ctx: CliContext) => Command> = [
  generateCommand,
  modelsCommand,
  doctorCommand,
  benchCommand,
  benchMemoryCommand,
  benchServeCommand,
  benchHttpCommand,
  profileCommand,
  planCommand,
  probeCommand,
  serveCommand,
  quantizeCommand,
];

/** Exit status of a command line the parser refused (unknown flag, missing value). */
const USAGE_EXIT = 2;

export function buildProgram(ctx: CliContext): Command {
  const program = new Command("kino")
    .description("run open video diffusion models (Wan 2.1) on any GPU")
    .version(packageVersion(), "-V, --version")
    .option("--debug", "log the engine's output and show stack traces of errors");
  for (const make of COMMANDS) program.addCommand(make(ctx));
  applyToAll(program, (cmd) =>
    cmd
      .exitOverride()
      .showHelpAfterError("(run with --help for usage)")
      .configureOutput({ writeOut: ctx.io.stdout, writeErr: ctx.io.stderr }),
  );
  return program;
}

/** Runs a command line (without the node and script arguments); resolves to the exit status. */
export async function runCli(argv: readonly string[], ctx: CliContext): Promise<number> {
  try {
    await buildProgram(ctx).parseAsync([...argv], { from: "user" });
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : USAGE_EXIT; // commander printed it
    const error = toKinoError(err);
    ctx.io.stderr(formatError(error, ctx.debug));
    if (argv.includes("--json")) ctx.io.stdout(JSON.stringify({ ok: false, error: error.toJSON() }) + "\n");
    return error.exitCode;
  }
}

/** The context of a real run: this process's streams, environment and signals. */
export function processContext(argv: readonly string[], signal: AbortSignal): CliContext {
  const config = resolveConfig();
  const debug = argv.includes("--debug");
  const logger = createLogger((line) => process.stderr.write(line), debug ? "debug" : "warn");
  return {
    argv,
    io: {
      stdout: (text) => void process.stdout.write(text),
      stderr: (text) => void process.stderr.write(text),
      stderrIsTTY: process.stderr.isTTY === true,
      columns: process.stderr.columns,
    },
    config,
    cwd: process.cwd(),
    logger,
    debug,
    startEngine: () => SubprocessEngine.start(config, logger),
    tools: {
      makeTiny: (dir, seed, options) => makeTinyCheckpoint(config, dir, seed, options),
      pull: (repoId, dir, options) => pullCheckpoint(config, repoId, dir, options),
    },
    signal,
  };
}

function applyToAll(cmd: Command, apply: (cmd: Command) => void): void {
  apply(cmd);
  for (const sub of cmd.commands) applyToAll(sub, apply);
}

function packageVersion(): string {
  try {
    return (JSON.parse(readFileSync(join(REPO_ROOT, "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
}

function isEntry(): boolean {
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return realpathSync(script) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (isEntry()) {
  const argv = process.argv.slice(2);
  const controller = new AbortController();
  // First Ctrl-C cancels the job cleanly (between steps); a second one leaves at once.
  process.on("SIGINT", () => {
    if (controller.signal.aborted) process.exit(130);
    process.stderr.write("\nkino: cancelling (Ctrl-C again to quit at once)\n");
    controller.abort();
  });
  const code = await runCli(argv, processContext(argv, controller.signal));
  process.stdout.write("", () => process.exit(code));
}
