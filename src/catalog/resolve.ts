/**
 * Turns what a user names as a model (a catalog id, a checkpoint folder, or "auto") into what the
 * engine loads, with the job defaults that suit it. Everything here answers before any engine starts,
 * except the choice behind "auto", which needs to know whether there is a GPU (`pickAutoModel`).
 */
import { access, stat } from "node:fs/promises";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { KinoError } from "../errors.ts";
import type { ModelSource } from "../protocol/engine.ts";
import { inspectCheckpoint } from "./checkpoint.ts";
import {
  catalogIds,
  findCatalogModel,
  TINY_DEFAULTS,
  TINY_ID,
  WAN21_1_3B_ID,
  WAN21_480P_DEFAULTS,
  WAN21_SHAPE,
  type CatalogModel,
  type JobDefaults,
  type ShapeRules,
} from "./models.ts";

export const AUTO_MODEL = "auto";

/** A model as named, before "auto" is decided. */
export type ModelRef =
  | { readonly kind: "auto" }
  | { readonly kind: "catalog"; readonly model: CatalogModel }
  | { readonly kind: "folder"; readonly path: string };

/** A model ready to load. */
export interface ResolvedModel {
  /** The catalog id or the folder. */
  readonly name: string;
  /** The catalog id, where it is one. */
  readonly id: string | null;
  /** The checkpoint folder (null for random weights). */
  readonly path: string | null;
  readonly randomWeights: boolean;
  /** kino's tiny model (by id or by its marker): random weights, its videos are noise. */
  readonly tiny: boolean;
  /** The tiny checkpoint is not made yet; `make-tiny` makes it on first use. */
  readonly needsMakeTiny: boolean;
  readonly defaults: JobDefaults;
  readonly shape: ShapeRules;
}

/** Where a catalog model lives under the models folder. */
export function catalogModelPath(modelsDir: string, id: string): string {
  return join(modelsDir, id);
}

/** Whether a catalog model's checkpoint is on disk (its model_index.json is there). */
export async function isModelPresent(modelsDir: string, id: string): Promise<boolean> {
  return access(join(catalogModelPath(modelsDir, id), "model_index.json")).then(() => true, () => false);
}

/**
 * Reads a --model value: "auto", a catalog id, or a folder (anything with a slash, starting with a
 * dot or a tilde, or naming an existing path).
 * @throws KinoError UNKNOWN_MODEL listing the known ids.
 */
export async function parseModelRef(value: string, cwd: string): Promise<ModelRef> {
  if (value === AUTO_MODEL) return { kind: "auto" };
  const model = findCatalogModel(value);
  if (model !== undefined) return { kind: "catalog", model };
  const pathLike = value.includes("/") || value.startsWith(".") || value.startsWith("~");
  const path = value === "~" || value.startsWith("~/") ? join(homedir(), value.slice(1)) : resolve(cwd, value);
  const exists = await stat(path).then(() => true, () => false);
  if (pathLike || exists) return { kind: "folder", path };
  throw new KinoError(
    "UNKNOWN_MODEL",
    `unknown model "${value}"; known ids: ${catalogIds().join(", ")} (or auto, or a checkpoint folder path)`,
    { field: "model" },
  );
}

/**
 * "auto": the 1.3B model when its weights are here and a CUDA GPU is present, else kino's tiny one.
 * Pure, so the rule is table-tested.
 */
export function pickAutoModel(facts: { readonly hasGpu: boolean; readonly wan13bPresent: boolean }): {
  id: string;
  reason: string;
} {
  if (facts.hasGpu && facts.wan13bPresent) return { id: WAN21_1_3B_ID, reason: "its weights are here and a CUDA GPU is present" };
  const why = !facts.hasGpu ? "no CUDA GPU is present" : `${WAN21_1_3B_ID} is not downloaded (kino models pull ${WAN21_1_3B_ID})`;
  return { id: TINY_ID, reason: why };
}

/**
 * Resolves a named model (not "auto") to a loadable one, checking the checkpoint on disk.
 * @throws KinoError MODEL_NOT_DOWNLOADED, NOT_A_CHECKPOINT, UNSUPPORTED_MODEL, BAD_CHECKPOINT,
 *   INVALID_ARGUMENT (random weights of a folder or of tiny).
 */
export async function resolveModel(
  ref: Exclude<ModelRef, { kind: "auto" }>,
  options: { readonly modelsDir: string; readonly randomWeights: boolean },
): Promise<ResolvedModel> {
  if (ref.kind === "folder") {
    if (options.randomWeights) {
      throw new KinoError(
        "INVALID_ARGUMENT",
        `random weights build a catalog model's architecture, not a folder; name one of ${withArchitecture().join(", ")} as the model`,
        { field: "randomWeights" },
      );
    }
    const info = await inspectCheckpoint(ref.path);
    return {
      name: ref.path,
      id: null,
      path: ref.path,
      randomWeights: false,
      tiny: info.tiny,
      needsMakeTiny: false,
      defaults: info.tiny ? TINY_DEFAULTS : WAN21_480P_DEFAULTS,
      shape: WAN21_SHAPE,
    };
  }
  const { model } = ref;
  const path = catalogModelPath(options.modelsDir, model.id);
  const base = { name: model.id, id: model.id, defaults: model.defaults, shape: model.shape };
  if (options.randomWeights) {
    if (model.architecture === null) {
      throw new KinoError(
        "INVALID_ARGUMENT",
        `random weights need a model with a full-size architecture (${withArchitecture().join(", ")}); ${model.id} has none`,
        { field: "randomWeights" },
      );
    }
    return { ...base, path: null, randomWeights: true, tiny: false, needsMakeTiny: false };
  }
  const present = await isModelPresent(options.modelsDir, model.id);
  if (model.origin === "kino") {
    if (present) await inspectCheckpoint(path);
    return { ...base, path, randomWeights: false, tiny: true, needsMakeTiny: !present };
  }
  if (!present) {
    throw new KinoError(
      "MODEL_NOT_DOWNLOADED",
      `${model.id} is not downloaded (looked in ${path}); run: kino models pull ${model.id} (or ask for random weights, for timings only)`,
      { field: "model" },
    );
  }
  await inspectCheckpoint(path);
  return { ...base, path, randomWeights: false, tiny: false, needsMakeTiny: false };
}

/** The protocol's model source for a resolved model. */
export function modelSource(model: ResolvedModel, seed: number): ModelSource {
  if (model.randomWeights) {
    const architecture = model.id === null ? null : (findCatalogModel(model.id)?.architecture ?? null);
    if (architecture === null) throw new KinoError("INTERNAL", `${model.name} has no architecture for random weights`);
    return { kind: "random", architecture, seed };
  }
  if (model.path === null) throw new KinoError("INTERNAL", `${model.name} has no checkpoint path`);
  return { kind: "checkpoint", path: model.path };
}

function withArchitecture(): string[] {
  return catalogIds().filter((id) => findCatalogModel(id)?.architecture !== null);
}
