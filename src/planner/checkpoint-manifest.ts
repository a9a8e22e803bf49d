/**
 * The planner's manifest of a diffusers Wan checkpoint folder, from its component configs (the same
 * formulas as a catalog architecture; no weights are read, only the transformer's safetensors headers,
 * for what a block streamed from disk reads). The tiny model plans too, though its plans are trivially
 * "everything resident".
 */
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { readSafetensorsHeader } from "../catalog/safetensors.ts";
import { KinoError } from "../errors.ts";
import { modelManifest, withWeightFiles, type ModelManifest } from "./manifest.ts";

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
  let manifest: ModelManifest;
  try {
    manifest = modelManifest(root, { transformer, textEncoder });
  } catch (err) {
    throw new KinoError("BAD_CHECKPOINT", `${root}: cannot plan from its configs: ${(err as Error).message}`, { field });
  }
  return withCheckpointFiles(manifest, root, field);
}

/**
 * `m` with the bytes the first transformer block takes in the checkpoint's safetensors files at `root` (all blocks are
 * alike): what streaming a block from disk reads, twice the bf16 block in Wan's float32 Diffusers files. Unchanged
 * where the folder has no transformer weights to read.
 */
export async function withCheckpointFiles(m: ModelManifest, root: string, field = "model"): Promise<ModelManifest> {
  const folder = join(root, "transformer");
  const files = await readdir(folder).catch(() => [] as string[]);
  let blockBytes = 0;
  for (const file of files.filter((f) => f.endsWith(".safetensors"))) {
    for (const [name, tensor] of (await readSafetensorsHeader(join(folder, file), field)).tensors) {
      if (name.startsWith("blocks.0.")) blockBytes += tensor.bytes;
    }
  }
  return blockBytes > 0 ? withWeightFiles(m, blockBytes) : m;
}
