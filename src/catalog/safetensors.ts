/**
 * Reads a safetensors file's header without touching the weights: 8 bytes of little-endian header
 * length, the JSON header (name → dtype, shape, byte range), then the data. A file whose header
 * does not parse or whose byte ranges run past its end is truncated or corrupt.
 */
import { open } from "node:fs/promises";
import { KinoError } from "../errors.ts";

export interface TensorInfo {
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly bytes: number;
}

export interface SafetensorsHeader {
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Bytes of tensor data, as the header describes it. */
  readonly dataBytes: number;
}

/** A header larger than this is not a header (the biggest real ones are a few MB). */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/**
 * @param field the request field the file came from, named in errors
 * @throws KinoError BAD_CHECKPOINT naming the file when it is truncated or corrupt.
 */
export async function readSafetensorsHeader(file: string, field = "model"): Promise<SafetensorsHeader> {
  const bad = (why: string) => new KinoError("BAD_CHECKPOINT", `${file} is not a valid safetensors file: ${why}`, { field });
  const handle = await open(file, "r");
  try {
    const { size } = await handle.stat();
    if (size < 8) throw bad(`it has ${size} bytes (truncated)`);
    const lengthBuf = Buffer.alloc(8);
    await handle.read(lengthBuf, 0, 8, 0);
    const headerLength = Number(lengthBuf.readBigUInt64LE(0));
    if (headerLength > MAX_HEADER_BYTES || 8 + headerLength > size) {
      throw bad(`its header claims ${headerLength} bytes but the file has ${size} (truncated or corrupt)`);
    }
    const headerBuf = Buffer.alloc(headerLength);
    await handle.read(headerBuf, 0, headerLength, 8);
    let header: unknown;
    try {
      header = JSON.parse(headerBuf.toString("utf8"));
    } catch {
      throw bad("its header is not JSON (corrupt)");
    }
    if (header === null || typeof header !== "object" || Array.isArray(header)) throw bad("its header is not an object");
    const dataSize = size - 8 - headerLength;
    const tensors = new Map<string, TensorInfo>();
    let dataBytes = 0;
    for (const [name, entry] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      const info = parseEntry(entry);
      if (info === null) throw bad(`the header entry of tensor ${name} is malformed`);
      if (info.end > dataSize) {
        throw bad(`tensor ${name} ends at byte ${info.end} of the data but the file holds ${dataSize} (truncated)`);
      }
      dataBytes = Math.max(dataBytes, info.end);
      tensors.set(name, { dtype: info.dtype, shape: info.shape, bytes: info.end - info.begin });
    }
    return { tensors, dataBytes };
  } finally {
    await handle.close();
  }
}

function parseEntry(entry: unknown): { dtype: string; shape: number[]; begin: number; end: number } | null {
  if (entry === null || typeof entry !== "object") return null;
  const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
  if (typeof dtype !== "string" || !Array.isArray(shape) || !Array.isArray(offsets) || offsets.length !== 2) return null;
  const [begin, end] = offsets;
  if (typeof begin !== "number" || typeof end !== "number" || begin < 0 || end < begin) return null;
  if (!shape.every((d) => Number.isInteger(d) && d >= 0)) return null;
  return { dtype, shape: shape as number[], begin, end };
}
