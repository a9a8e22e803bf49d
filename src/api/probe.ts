/**
 * `kino probe` as a function, and the probe where engines start: this machine's measured hardware
 * profile, from kino's cache (`<cache>/probe`, see planner/probe-cache.ts) or measured by the engine
 * when the cache has none for this GPU, driver, torch and host.
 */
import { join } from "node:path";
import type { KinoConfig } from "../config/config.ts";
import type { EngineClient, EngineFactory } from "../engine/client.ts";
import { toKinoError } from "../errors.ts";
import { silentLogger, type Logger } from "../log.ts";
import type { HardwareProfile } from "../planner/hardware.ts";
import { hardwareFromProbe, measuredProfiles, ProbeCache, probeCached, probeKey, type CachedProbe, type MeasuredProfiles, type ProbeAsk } from "../planner/probe-cache.ts";

export interface ProbeReport extends CachedProbe {
  /** What the planner plans with (median rates over the shapes measured); null without a GPU. */
  readonly profile: HardwareProfile | null;
}

export interface ProbeDeps {
  readonly config: KinoConfig;
  readonly startEngine: EngineFactory;
  readonly logger?: Logger;
  /** @default kino's cache folder, entries for 30 days */
  readonly cache?: ProbeCache;
}

/** kino's probe cache: `<cache>/probe`. */
export function probeCacheFor(config: KinoConfig, logger: Logger = silentLogger): ProbeCache {
  return new ProbeCache({ dir: join(config.cache, "probe"), logger });
}

/** Starts an engine, asks it who it is, and answers from the cache or with its measurement. */
export async function probeMachine(deps: ProbeDeps, ask: ProbeAsk = {}): Promise<ProbeReport> {
  const cache = deps.cache ?? probeCacheFor(deps.config, deps.logger);
  const engine = await deps.startEngine();
  try {
    const probed = await probeCached(engine, await engine.hello(), cache, ask);
    return { ...probed, profile: probed.result.device === "cuda" ? hardwareFromProbe(probed.result) : null };
  } finally {
    await engine.close();
  }
}

export interface ProbingDeps {
  readonly cache: ProbeCache;
  readonly logger: Logger;
  /** @default the process's measuredProfiles */
  readonly profiles?: MeasuredProfiles;
}

/**
 * An engine factory whose engines have their GPU measured before they are handed out, once per
 * machine: from the cache, or with a full probe (about 10 s) when it has none. The measurement goes
 * to `profiles`, where the server's planning finds it by GPU name. An engine without a GPU is not
 * probed; engines of one GPU model starting together share one probe. A probe that fails (an engine
 * that predates it, an OOM) is logged and the engine is used as it is: the planner keeps its preset rates.
 */
export function probingFactory<P>(start: (placement: P) => Promise<EngineClient>, deps: ProbingDeps): (placement: P) => Promise<EngineClient> {
  const profiles = deps.profiles ?? measuredProfiles;
  const inFlight = new Map<string, Promise<void>>();
  return async (placement) => {
    const engine = await start(placement);
    try {
      const hello = await engine.hello();
      const gpu = hello.devices[0];
      if (gpu === undefined || profiles.has(gpu.name)) return engine;
      const id = JSON.stringify(probeKey(hello));
      let probing = inFlight.get(id);
      if (probing === undefined) {
        probing = probeCached(engine, hello, deps.cache).then((p) => {
          profiles.remember(p.result);
          deps.logger.info(`${gpu.name}: ${p.cached ? `measured profile from ${p.path} (${p.probedAt})` : `measured in ${(p.result.ms / 1000).toFixed(1)} s, kept in ${p.path}`}`);
        });
        inFlight.set(id, probing);
        void probing.finally(() => inFlight.delete(id)).catch(() => {});
      }
      await probing;
    } catch (err) {
      deps.logger.warn(`could not measure the GPU's profile (${toKinoError(err).message}); planning with the preset's rates`);
    }
    return engine;
  };
}
