/**
 * The planner's manifest of a diffusers Wan checkpoint folder, from its component configs (the same
 * formulas as a catalog architecture; no weights are read). The tiny model plans too, though its
 * plans are trivially "everything resident".
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { KinoError } from "../errors.ts";
import { modelManifest, type ModelManifest } from "./manifest.ts";

async function config(root: string, component: string, field: string): Promise<Record<string, unknown>> {
  const path = join(root, component, "config.json");
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch {
    throw new KinoError("NOT_A_CHECKPOINT", `${root} has no ${component}/config.json to plan from`, { field });
  }
  try {
    const parsed = JSON.parse(text) as unknown;
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error("not an object");
    return parsed as Record<string, unknown>;
  } catch (err) {
    throw new KinoError("BAD_CHECKPOINT", `${path} is not a JSON object: ${(err as Error).message}`, { field });
  }
}

/** The manifest of the checkpoint at `root` (transformer and text encoder configs). */
export async function checkpointManifest(root: string, field = "model"): Promise<ModelManifest> {
  // One after the other, so a folder missing both names the transformer (the same error every time).
  const transformer = await config(root, "transformer", field);
  const textEncoder = await config(root, "text_encoder", field);
  try {
    return modelManifest(root, { transformer, textEncoder });
  } catch (err) {
    throw new KinoError("BAD_CHECKPOINT", `${root}: cannot plan from its configs: ${(err as Error).message}`, { field });
  }
}
