/**
 * kino's configuration, resolved once into a frozen, fully populated object. This is the only module
 * that reads `process.env`; everything else takes a `KinoConfig` (or the part it needs) as a parameter.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export interface KinoConfig {
  /** kino's home: models, caches of measurements. `$KINO_HOME`, @default ~/.kino */
  readonly home: string;
  /** Where models live, one folder per catalog id. @default <home>/models */
  readonly modelsDir: string;
  /** kino's download and environment cache. `$KINO_CACHE`, @default ${XDG_CACHE_HOME:-~/.cache}/kino */
  readonly cache: string;
  /** The Python interpreter of the engine. `$KINO_PYTHON`, @default <cache>/python-<lock hash>/bin/python */
  readonly python: string;
  /** Whether `python` came from `$KINO_PYTHON` (doctor's fix differs). */
  readonly pythonFromEnv: boolean;
  /** The repository (or installed package) root. */
  readonly repoRoot: string;
  /** The Python engine's source folder, put on the worker's PYTHONPATH. @default <repoRoot>/engine */
  readonly engineDir: string;
  /** A worker that sends nothing for this long while a request is pending is declared stalled. @default 300000 */
  readonly stallTimeoutMs: number;
  /** The environment engine processes inherit (a frozen copy of the one resolved from). */
  readonly childEnv: Env;
  /** How long `close()` waits for the worker to exit after `shutdown` before killing it. @default 5000 */
  readonly shutdownGraceMs: number;
  /** Where `kino serve` keeps its job database and the jobs' outputs. `$KINO_DATA_DIR`, @default <home>/data */
  readonly dataDir: string;
  /**
   * The key `kino serve` requires as `Authorization: Bearer <key>` (and needs to bind beyond the
   * loopback address). An environment variable rather than only a flag, so it stays out of `ps`.
   * `$KINO_API_KEY`, @default null (none)
   */
  readonly apiKey: string | null;
}

export type Env = Readonly<Record<string, string | undefined>>;

/** The repository root: this file is compiled to <root>/dist/src/config/config.js. */
export const REPO_ROOT = fileURLToPath(new URL("../../../", import.meta.url)).replace(/\/$/, "");

/**
 * The Python environment's folder, keyed by the lock file exactly as scripts/lib/env.sh computes it
 * (first 16 hex digits of the lock's sha256), so set-up and the CLI agree on where it is.
 */
export function pythonEnvDir(cache: string, repoRoot: string): string {
  let hash = "missing-lock";
  try {
    hash = createHash("sha256")
      .update(readFileSync(join(repoRoot, "engine", "requirements.lock")))
      .digest("hex")
      .slice(0, 16);
  } catch {
    // No lock file: a broken install. The path then names no environment and doctor reports it.
  }
  return join(cache, `python-${hash}`);
}

/**
 * Resolves the configuration from the environment and explicit overrides (overrides win).
 * @param env defaults to `process.env`
 */
export function resolveConfig(env: Env = process.env, overrides: Partial<KinoConfig> = {}): KinoConfig {
  const home = overrides.home ?? resolve(nonEmpty(env.KINO_HOME) ?? join(homedir(), ".kino"));
  const cacheBase = nonEmpty(env.XDG_CACHE_HOME) ?? join(homedir(), ".cache");
  const cache = overrides.cache ?? resolve(nonEmpty(env.KINO_CACHE) ?? join(cacheBase, "kino"));
  const repoRoot = overrides.repoRoot ?? REPO_ROOT;
  const envPython = nonEmpty(env.KINO_PYTHON);
  const python = overrides.python ?? envPython ?? join(pythonEnvDir(cache, repoRoot), "bin", "python");
  return Object.freeze({
    home,
    modelsDir: overrides.modelsDir ?? join(home, "models"),
    cache,
    python,
    pythonFromEnv: overrides.pythonFromEnv ?? (overrides.python === undefined && envPython !== undefined),
    repoRoot,
    engineDir: overrides.engineDir ?? join(repoRoot, "engine"),
    stallTimeoutMs: overrides.stallTimeoutMs ?? 300_000,
    shutdownGraceMs: overrides.shutdownGraceMs ?? 5_000,
    childEnv: overrides.childEnv ?? Object.freeze({ ...env }),
    dataDir: overrides.dataDir ?? resolve(nonEmpty(env.KINO_DATA_DIR) ?? join(home, "data")),
    apiKey: overrides.apiKey !== undefined ? overrides.apiKey : (nonEmpty(env.KINO_API_KEY) ?? null),
  });
}

function nonEmpty(v: string | undefined): string | undefined {
  return v === undefined || v === "" ? undefined : v;
}
