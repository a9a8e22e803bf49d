/**
 * `kino plan` as a function: from a catalog id, a job shape, a budget and a named GPU profile to a
 * Plan, without weights and without an engine. Checks every input and names the field at fault.
 */
import { resolve } from "node:path";
import { findCatalogModel, catalogIds, WAN21_480P_DEFAULTS, WAN21_SHAPE, type JobDefaults, type ShapeRules } from "../catalog/models.ts";
import { checkpointManifest } from "../planner/checkpoint-manifest.ts";
import { KinoError } from "../errors.ts";
import { findHardwarePreset, GiB, HARDWARE_PRESETS, type HardwareProfile } from "../planner/hardware.ts";
import { modelManifest, WEIGHT_MODES, type ModelManifest, type WeightMode } from "../planner/manifest.ts";
import { plan, type MemoryLevel, type Plan } from "../planner/plan.ts";
import { hardwareFromProbe } from "../planner/probe-cache.ts";
import type { ProbeResult } from "../protocol/engine.ts";
import { parseSize } from "./generate-options.ts";

export interface PlanOptions {
  /** A catalog id with an architecture. @default "wan2.1-t2v-1.3b" */
  readonly model?: string;
  /** "WIDTHxHEIGHT". @default the model's (832x480) */
  readonly size?: string;
  readonly frames?: number;
  readonly steps?: number;
  readonly guidance?: number;
  /** A byte size such as "12GB" (GB and GiB both mean 2³⁰ bytes). @default the GPU's free VRAM */
  readonly vram?: string;
  /** @default the GPU profile's host RAM */
  readonly ram?: string;
  /** "0".."3" or "auto". @default "auto" */
  readonly memoryLevel?: string;
  /** exact, a low-bit mode (fp8, int8, …) or auto. @default exact */
  readonly precision?: string;
  /** A named hardware profile. @default "h100-80gb" */
  readonly gpu?: string;
  /** A measurement of this machine (kino probe) to plan on instead of the named profile. */
  readonly probe?: ProbeResult;
}

export interface PlanResult {
  readonly plan: Plan;
  readonly manifest: ModelManifest;
  readonly hardware: HardwareProfile;
}

const invalid = (field: string, message: string) => new KinoError("INVALID_ARGUMENT", message, { field });

const UNITS: Readonly<Record<string, number>> = { "": GiB, b: 1, k: 2 ** 10, kb: 2 ** 10, kib: 2 ** 10, m: 2 ** 20, mb: 2 ** 20, mib: 2 ** 20, g: GiB, gb: GiB, gib: GiB, t: 2 ** 40, tb: 2 ** 40, tib: 2 ** 40 };

/** "12GB" → bytes. A bare number is GiB; GB and GiB are both 2³⁰ (cards are sold in those). */
export function parseByteSize(value: string, field: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(value);
  const unit = match?.[2]?.toLowerCase();
  if (match === null || unit === undefined || !Object.hasOwn(UNITS, unit)) {
    throw invalid(field, `must be a size such as 12GB or 512MB; got "${value}"`);
  }
  const bytes = Number(match[1]) * UNITS[unit]!;
  if (!(bytes > 0)) throw invalid(field, `must be above 0; got "${value}"`);
  return bytes;
}

/** "--precision": exact, a low-bit mode, or auto; undefined keeps exact. */
export function parseWeights(value: string | undefined): WeightMode | "auto" | undefined {
  if (value === undefined) return undefined;
  if (value === "auto" || (WEIGHT_MODES as readonly string[]).includes(value)) return value as WeightMode | "auto";
  throw invalid("precision", `must be one of ${[...WEIGHT_MODES, "auto"].join(", ")}; got "${value}"`);
}

export function parseMemoryLevel(value: string | undefined): MemoryLevel | "auto" {
  if (value === undefined || value === "auto") return "auto";
  if (["0", "1", "2", "3"].includes(value)) return Number(value) as MemoryLevel;
  throw invalid("memoryLevel", `must be 0, 1, 2, 3 or auto; got "${value}"`);
}

/**
 * Plans a request for a catalog id, or for a checkpoint folder (a path: its component configs give
 * the manifest; Wan 2.1's 480p defaults apply). No weights are read.
 */
export async function planModelOrFolder(o: PlanOptions, cwd: string): Promise<PlanResult> {
  const id = o.model ?? "wan2.1-t2v-1.3b";
  if (findCatalogModel(id) !== undefined || !(id.includes("/") || id.startsWith("."))) return planModel(o);
  const root = resolve(cwd, id);
  return planWith(await checkpointManifest(root), WAN21_480P_DEFAULTS, WAN21_SHAPE, o);
}

/** Plans a request for a catalog id. Pure apart from reading the built-in catalog. */
export function planModel(o: PlanOptions): PlanResult {
  const id = o.model ?? "wan2.1-t2v-1.3b";
  const model = findCatalogModel(id);
  if (model === undefined) throw new KinoError("UNKNOWN_MODEL", `unknown model "${id}"; known ids: ${catalogIds().join(", ")} (or a checkpoint folder)`, { field: "model" });
  if (model.architecture === null) throw invalid("model", `${id} has no full-size architecture to plan from; use a Wan 2.1 id`);
  return planWith(modelManifest(id, model.architecture), model.defaults, model.shape, o);
}

function planWith(manifest: ModelManifest, d: JobDefaults, shape: ShapeRules, o: PlanOptions): PlanResult {
  const hardware = o.probe !== undefined ? hardwareFromProbe(o.probe, { modelWidth: manifest.transformer.shape.width }) : findHardwarePreset(o.gpu ?? "h100-80gb");
  if (hardware === undefined) throw invalid("gpu", `unknown GPU profile "${o.gpu}"; known: ${HARDWARE_PRESETS.map((h) => h.name).join(", ")}`);
  const { width, height } = o.size === undefined ? { width: d.width, height: d.height } : parseSize(o.size, shape);
  const frames = o.frames ?? d.frames;
  const t = shape.temporalMultiple;
  if (!Number.isInteger(frames) || frames < 1 || (frames - 1) % t !== 0) throw invalid("frames", `must be a whole number of the form ${t}k+1 (e.g. 81); got ${frames}`);
  const steps = o.steps ?? d.steps;
  if (!Number.isInteger(steps) || steps < 1) throw invalid("steps", `must be a whole number ≥ 1 (50 is Wan's default); got ${steps}`);
  const guidance = o.guidance ?? d.guidance;
  if (!(Number.isFinite(guidance) && guidance >= 0)) throw invalid("guidance", `must be ≥ 0 (5 is Wan's default); got ${guidance}`);
  const budget = {
    vram: o.vram === undefined ? undefined : parseByteSize(o.vram, "vram"),
    ram: o.ram === undefined ? undefined : parseByteSize(o.ram, "ram"),
    memoryLevel: parseMemoryLevel(o.memoryLevel),
    weights: parseWeights(o.precision),
  };
  return { plan: plan(manifest, hardware, { width, height, frames, steps, guidance }, budget), manifest, hardware };
}
