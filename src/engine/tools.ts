/**
 * The engine's one-shot tools (`python -m kino_engine.tools …`, and any module speaking the same
 * convention, such as kino_engine.bench): make-tiny builds kino's tiny random-weight checkpoint,
 * pull downloads a hub checkpoint. Each prints its answer as JSON on the last line of stdout:
 * {"ok": true, …} or {"ok": false, "error": {"code", "message"}} (exit status 1).
 */
import { spawn } from "node:child_process";
import { z } from "zod";
import type { KinoConfig } from "../config/config.ts";
import { isErrorCode, KinoError } from "../errors.ts";
import { silentLogger, type Logger } from "../log.ts";
import { pythonModuleCommand } from "./python.ts";
import { OutputTail } from "./stderr-tail.ts";

const ToolAnswer = z.discriminatedUnion("ok", [
  z.looseObject({ ok: z.literal(true) }),
  z.object({ ok: z.literal(false), error: z.object({ code: z.string(), message: z.string() }) }),
]);

export interface ToolOptions {
  /** The Python module to run. @default "kino_engine.tools" */
  module?: string;
  signal?: AbortSignal;
  logger?: Logger;
  /** Called with each line the tool writes to stderr (progress of a download, for instance). */
  onStderrLine?: (line: string) => void;
}

/**
 * Runs a tool to completion and returns its answer.
 * @throws KinoError with the tool's code where it is one of kino's, else TOOL_FAILED; CANCELLED when aborted.
 */
export async function runEngineTool(
  config: KinoConfig,
  args: readonly string[],
  options: ToolOptions = {},
): Promise<Record<string, unknown>> {
  const logger = options.logger ?? silentLogger;
  const module = options.module ?? "kino_engine.tools";
  if (options.signal?.aborted) throw new KinoError("CANCELLED", `${module} ${args[0] ?? ""} was cancelled before it started`);
  const { command, args: argv, env } = await pythonModuleCommand(config, module, args);
  const what = `${module} ${args[0] ?? ""}`.trim();
  const stdout = new OutputTail(16, 64 * 1024);
  const stderr = new OutputTail();
  const child = spawn(command, argv, { env, stdio: ["ignore", "pipe", "pipe"], detached: true });
  const kill = () => {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
    } catch {
      // already gone
    }
  };
  options.signal?.addEventListener("abort", kill, { once: true });
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
    for (const line of stdout.push(chunk)) logger.debug(`${what} stdout: ${line}`);
  });
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
    for (const line of stderr.push(chunk)) {
      logger.debug(`${what} stderr: ${line}`);
      options.onStderrLine?.(line);
    }
  });
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
    child.once("error", (err) => reject(new KinoError("ENGINE_UNAVAILABLE", `cannot start ${what}: ${err.message}`)));
    child.once("close", (c, s) => resolve([c, s]));
  }).finally(() => options.signal?.removeEventListener("abort", kill));
  if (options.signal?.aborted) throw new KinoError("CANCELLED", `${what} was cancelled`);

  const last = stdout.text().trim().split("\n").pop() ?? "";
  let answer: z.infer<typeof ToolAnswer> | undefined;
  try {
    answer = ToolAnswer.parse(JSON.parse(last));
  } catch {
    answer = undefined;
  }
  const tail = stderr.text();
  if (answer === undefined) {
    const how = signal !== null ? `was killed by ${signal}` : `exited with code ${code}`;
    throw new KinoError("TOOL_FAILED", `${what} ${how} without an answer on its last stdout line`, { stderrTail: tail });
  }
  if (!answer.ok) {
    const { code: errorCode, message } = answer.error;
    if (isErrorCode(errorCode)) throw new KinoError(errorCode, message, { stderrTail: tail });
    throw new KinoError("TOOL_FAILED", `${what}: ${errorCode}: ${message}`, { stderrTail: tail });
  }
  return answer;
}

/** Builds kino's tiny random-weight Wan checkpoint in `dir` (diffusers format plus a kino_tiny.json marker). */
export function makeTinyCheckpoint(
  config: KinoConfig,
  dir: string,
  seed: number | undefined,
  options: ToolOptions = {},
): Promise<Record<string, unknown>> {
  return runEngineTool(config, ["make-tiny", dir, ...(seed === undefined ? [] : ["--seed", String(seed)])], options);
}

/** Downloads a hub repository's checkpoint into `dir`. */
export function pullCheckpoint(
  config: KinoConfig,
  repoId: string,
  dir: string,
  options: ToolOptions = {},
): Promise<Record<string, unknown>> {
  return runEngineTool(config, ["pull", repoId, dir], options);
}
