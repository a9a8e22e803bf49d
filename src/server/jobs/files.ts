/**
 * Where a job's outputs live: <dataDir>/jobs/<job id>/<file>. Every path is built here from a
 * checked id and a checked file name, and checked again to lie inside the data folder, so nothing a
 * client sends can name a file elsewhere.
 */
import { join, relative, resolve, sep } from "node:path";
import { KinoError } from "../../errors.ts";
import { JOB_ID_PATTERN } from "../schemas.ts";

const FILE_NAME = /^[\w][\w.-]*$/;

/** The folder of a job's outputs. @throws KinoError INVALID_ARGUMENT for anything but a job id. */
export function jobFolder(dataDir: string, id: string): string {
  if (!JOB_ID_PATTERN.test(id)) throw new KinoError("INVALID_ARGUMENT", `"${id.slice(0, 80)}" is not a job id`, { field: "id" });
  return inside(dataDir, join("jobs", id));
}

/** A file of a job's folder. @throws KinoError INVALID_ARGUMENT for a name that is not a plain file name. */
export function jobFile(dataDir: string, id: string, file: string): string {
  if (!FILE_NAME.test(file)) throw new KinoError("INVALID_ARGUMENT", `"${file.slice(0, 80)}" is not a file name`, { field: "file" });
  return inside(jobFolder(dataDir, id), file);
}

function inside(root: string, path: string): string {
  const base = resolve(root);
  const full = resolve(base, path);
  const rel = relative(base, full);
  if (rel === "" || rel.startsWith("..") || rel.startsWith(sep)) {
    throw new KinoError("INVALID_ARGUMENT", `${path} is outside the data folder`, { field: "id" });
  }
  return full;
}
