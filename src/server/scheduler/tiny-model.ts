/**
 * kino's tiny model is made on first use, as `kino generate` does: into a side folder renamed into
 * place, so an interrupted make leaves nothing that looks finished. Concurrent jobs share one make.
 */
import { randomBytes } from "node:crypto";
import { access, mkdir, rename, rm } from "node:fs/promises";
import { dirname, join } from "node:path";

export type MakeTiny = (dir: string) => Promise<unknown>;

const making = new Map<string, Promise<void>>();

/** Whether `dir` holds a checkpoint (its model_index.json). */
export function hasCheckpoint(dir: string): Promise<boolean> {
  return access(join(dir, "model_index.json")).then(() => true, () => false);
}

/** Makes the tiny checkpoint at `dir` unless it is there; resolves once it is. */
export function ensureTinyModel(dir: string, makeTiny: MakeTiny): Promise<void> {
  let pending = making.get(dir);
  if (pending === undefined) {
    pending = make(dir, makeTiny).finally(() => making.delete(dir));
    making.set(dir, pending);
  }
  return pending;
}

async function make(dir: string, makeTiny: MakeTiny): Promise<void> {
  if (await hasCheckpoint(dir)) return;
  await mkdir(dirname(dir), { recursive: true });
  const side = `${dir}.making-${randomBytes(4).toString("hex")}`;
  try {
    await makeTiny(side);
    await rename(side, dir).catch((err: NodeJS.ErrnoException) => {
      // Another process made it first: its copy is as good.
      if (err.code !== "ENOTEMPTY" && err.code !== "EEXIST") throw err;
    });
  } finally {
    await rm(side, { recursive: true, force: true });
  }
}
