/**
 * How the control plane runs the engine's Python: the interpreter from the config, the engine's
 * sources on PYTHONPATH. Shared by the worker (SubprocessEngine) and the one-shot tools.
 */
import { constants } from "node:fs";
import { access } from "node:fs/promises";
import { join } from "node:path";
import type { KinoConfig } from "../config/config.ts";
import { KinoError } from "../errors.ts";

export interface ProcessCommand {
  readonly command: string;
  readonly args: readonly string[];
  readonly env: Readonly<Record<string, string | undefined>>;
}

/**
 * The command that runs `python -m <module> <args>` with the engine importable.
 * @throws KinoError ENGINE_UNAVAILABLE when the interpreter or the module's source is missing.
 */
export async function pythonModuleCommand(
  config: Pick<KinoConfig, "python" | "pythonFromEnv" | "engineDir" | "childEnv">,
  module: string,
  args: readonly string[] = [],
  extraEnv: Record<string, string> = {},
): Promise<ProcessCommand> {
  const runnable = await access(config.python, constants.X_OK).then(() => true, () => false);
  if (!runnable) {
    const fix = config.pythonFromEnv ? "point KINO_PYTHON at a Python with the engine's requirements" : "run scripts/setup.sh";
    throw new KinoError("ENGINE_UNAVAILABLE", `the engine's Python ${config.python} is missing; ${fix}`);
  }
  // A module is a file (kino_engine/bench.py) or a package run through its __main__ (kino_engine/quant/).
  const base = join(config.engineDir, ...module.split("."));
  const source = (await access(base + ".py").then(() => true, () => false)) ? base + ".py" : join(base, "__main__.py");
  const present = await access(source).then(() => true, () => false);
  if (!present) {
    throw new KinoError("ENGINE_UNAVAILABLE", `the engine's source ${source} is missing; this install of kino is incomplete`);
  }
  const inherited = config.childEnv.PYTHONPATH;
  return {
    command: config.python,
    args: ["-m", module, ...args],
    env: {
      ...config.childEnv,
      PYTHONPATH: inherited ? `${config.engineDir}:${inherited}` : config.engineDir,
      // Tracebacks and progress reach us as they happen, not when a buffer fills.
      PYTHONUNBUFFERED: "1",
      ...extraEnv,
    },
  };
}
