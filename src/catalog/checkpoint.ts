/**
 * Checks that a folder is a diffusers-format checkpoint kino can run, without loading it: a
 * model_index.json naming the pipeline and its components, a folder per component, and intact
 * safetensors files (headers read, byte ranges within the files). The engine checks again when it
 * loads; this check answers before any engine starts, with the same codes.
 */
import { access, readFile, readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { KinoError } from "../errors.ts";
import { TINY_MARKER } from "./models.ts";
import { readSafetensorsHeader } from "./safetensors.ts";

/** The diffusers pipelines kino runs. */
export const SUPPORTED_PIPELINES = ["WanPipeline"] as const;

export interface CheckpointInfo {
  readonly path: string;
  readonly pipeline: string;
  /** Components named in model_index.json, each a subfolder. */
  readonly components: readonly string[];
  /** Bytes of tensor data over all safetensors files. */
  readonly weightBytes: number;
  /** Made by `kino models make-tiny`: random weights, its videos are noise. */
  readonly tiny: boolean;
}

/**
 * @param field the request field the folder came from, named in errors
 * @throws KinoError NOT_A_CHECKPOINT, UNSUPPORTED_MODEL or BAD_CHECKPOINT
 */
export async function inspectCheckpoint(path: string, field = "model"): Promise<CheckpointInfo> {
  const notCheckpoint = (why: string) =>
    new KinoError("NOT_A_CHECKPOINT", `${path} is not a diffusers checkpoint folder: ${why}`, { field });
  const st = await stat(path).catch(() => null);
  if (st === null) throw notCheckpoint("it does not exist");
  if (!st.isDirectory()) throw notCheckpoint("it is a file, not a folder");

  const indexPath = join(path, "model_index.json");
  const indexText = await readFile(indexPath, "utf8").catch(() => null);
  if (indexText === null) throw notCheckpoint("model_index.json is missing");
  let index: Record<string, unknown>;
  try {
    index = JSON.parse(indexText) as Record<string, unknown>;
  } catch {
    throw new KinoError("BAD_CHECKPOINT", `${indexPath} is not valid JSON (corrupt)`, { field });
  }
  const pipeline = index._class_name;
  if (typeof pipeline !== "string") throw notCheckpoint("model_index.json has no _class_name");
  if (!(SUPPORTED_PIPELINES as readonly string[]).includes(pipeline)) {
    throw new KinoError(
      "UNSUPPORTED_MODEL",
      `${path} holds a ${pipeline}; kino runs ${SUPPORTED_PIPELINES.join(", ")} checkpoints`,
      { field },
    );
  }
  // Components are the entries whose value is [library, class]; [null, null] marks an absent one.
  const components = Object.entries(index)
    .filter(([k, v]) => !k.startsWith("_") && Array.isArray(v) && v.length === 2 && v[0] !== null)
    .map(([k]) => k);

  let weightBytes = 0;
  for (const component of components) {
    const dir = join(path, component);
    const isDir = await stat(dir).then((s) => s.isDirectory(), () => false);
    if (!isDir) throw notCheckpoint(`the component folder ${component}/ is missing (model_index.json lists it)`);
    weightBytes += await checkComponentWeights(dir, component, field);
  }
  const tiny = await access(join(path, TINY_MARKER)).then(() => true, () => false);
  return { path, pipeline, components, weightBytes, tiny };
}

/** Checks a component's safetensors files (and the shards its index names); returns their data bytes. */
async function checkComponentWeights(dir: string, component: string, field: string): Promise<number> {
  const files = await readdir(dir);
  const hasConfig = files.includes("config.json");
  const shards = files.filter((f) => f.endsWith(".safetensors"));
  for (const indexFile of files.filter((f) => f.endsWith(".safetensors.index.json"))) {
    for (const shard of await shardsOf(join(dir, indexFile), field)) {
      if (!shards.includes(shard)) {
        throw new KinoError("BAD_CHECKPOINT", `${join(dir, shard)} is missing (${indexFile} names it)`, { field });
      }
    }
  }
  // A model component (it has a config.json) must have weights; tokenizers and schedulers have none.
  if (hasConfig && shards.length === 0 && !files.some((f) => f.endsWith(".bin"))) {
    throw new KinoError("BAD_CHECKPOINT", `${dir} has no weights (no .safetensors file in ${component}/)`, { field });
  }
  let bytes = 0;
  for (const shard of shards) {
    bytes += (await readSafetensorsHeader(join(dir, shard), field)).dataBytes;
  }
  return bytes;
}

async function shardsOf(indexPath: string, field: string): Promise<string[]> {
  try {
    const index = JSON.parse(await readFile(indexPath, "utf8")) as { weight_map?: Record<string, string> };
    return [...new Set(Object.values(index.weight_map ?? {}))];
  } catch {
    throw new KinoError("BAD_CHECKPOINT", `${indexPath} is not valid JSON (corrupt)`, { field });
  }
}
