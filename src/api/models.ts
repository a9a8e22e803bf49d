/**
 * The model commands' API: what the catalog holds and what is on disk, making kino's tiny model,
 * and downloading a catalog model into kino's home.
 */
import { mkdir } from "node:fs/promises";
import { resolve } from "node:path";
import type { KinoConfig } from "../config/config.ts";
import { CATALOG, catalogIds, findCatalogModel, TINY_ID } from "../catalog/models.ts";
import { catalogModelPath, isModelPresent } from "../catalog/resolve.ts";
import { KinoError } from "../errors.ts";
import type { ToolOptions } from "../engine/tools.ts";

export interface ModelListing {
  readonly id: string;
  readonly description: string;
  readonly origin: "hub" | "kino";
  readonly hubRepo: string | null;
  /** Where it lives (or would) under kino's home. */
  readonly path: string;
  readonly present: boolean;
  /** Can be run with random weights for timings (`--random-weights`). */
  readonly randomWeights: boolean;
}

export async function listModels(config: Pick<KinoConfig, "modelsDir">): Promise<ModelListing[]> {
  return Promise.all(
    CATALOG.map(async (m) => ({
      id: m.id,
      description: m.description,
      origin: m.origin,
      hubRepo: m.hubRepo,
      path: catalogModelPath(config.modelsDir, m.id),
      present: await isModelPresent(config.modelsDir, m.id),
      randomWeights: m.architecture !== null,
    })),
  );
}

/** The engine's one-shot tools, injected so the commands are testable without Python. */
export interface ModelTools {
  makeTiny(dir: string, seed: number | undefined, options?: ToolOptions): Promise<Record<string, unknown>>;
  pull(repoId: string, dir: string, options?: ToolOptions): Promise<Record<string, unknown>>;
}

/**
 * Makes kino's tiny checkpoint in `dir`: a new or empty folder, or an earlier tiny checkpoint, which
 * is replaced (the tool refuses anything else with OUTPUT_UNWRITABLE).
 */
export async function makeTinyModel(
  dir: string,
  seed: number | undefined,
  deps: { readonly tools: ModelTools; readonly cwd: string },
  options: ToolOptions = {},
): Promise<{ path: string; answer: Record<string, unknown> }> {
  const path = resolve(deps.cwd, dir);
  checkTinySeed(seed);
  return { path, answer: await deps.tools.makeTiny(path, seed, options) };
}

/** @throws KinoError INVALID_ARGUMENT unless the seed is a whole number ≥ 0. */
export function checkTinySeed(seed: number | undefined): void {
  if (seed !== undefined && !(Number.isInteger(seed) && seed >= 0)) {
    throw new KinoError("INVALID_ARGUMENT", `must be a whole number ≥ 0; got ${seed}`, { field: "seed" });
  }
}

/**
 * Downloads a catalog model into <home>/models/<id>. The engine's pull tool downloads into a side
 * folder (<id>.partial, which a later pull resumes) and renames it into place once it is complete and
 * checked, so a half-done pull never looks present.
 * @throws KinoError UNKNOWN_MODEL, INVALID_ARGUMENT (tiny is made, not pulled)
 */
export async function pullModel(
  id: string,
  deps: { readonly tools: ModelTools; readonly config: Pick<KinoConfig, "modelsDir"> },
  options: ToolOptions = {},
): Promise<{ id: string; path: string; alreadyPresent: boolean }> {
  const model = findCatalogModel(id);
  if (model === undefined) {
    throw new KinoError("UNKNOWN_MODEL", `unknown model "${id}"; known ids: ${catalogIds().join(", ")}`, { field: "id" });
  }
  const path = catalogModelPath(deps.config.modelsDir, id);
  if (model.hubRepo === null) {
    throw new KinoError("INVALID_ARGUMENT", `${TINY_ID} is made by kino, not downloaded: it is made on first use of --model ${TINY_ID}, or run kino models make-tiny DIR`, {
      field: "id",
    });
  }
  if (await isModelPresent(deps.config.modelsDir, id)) return { id, path, alreadyPresent: true };
  await mkdir(deps.config.modelsDir, { recursive: true });
  await deps.tools.pull(model.hubRepo, path, options);
  return { id, path, alreadyPresent: false };
}
