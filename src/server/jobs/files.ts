/**
 * Where a job's outputs live: <dataDir>/jobs/<job id>/<file>, its previews in previews/<step>.png
 * there. Every path is built here from a checked id and a checked file name (or step), and checked
 * again to lie inside the data folder, so nothing a client sends can name a file elsewhere.
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

/** The folder of a job's previews, inside its folder. */
export const PREVIEWS_FOLDER = "previews";

/**
 * The PNG of the preview a job took at a denoising step: <job folder>/previews/<step>.png.
 * @throws KinoError INVALID_ARGUMENT for anything but a job id, or a step that is not a whole number ≥ 1
 */
export function previewFile(dataDir: string, id: string, step: number): string {
  if (!Number.isSafeInteger(step) || step < 1) throw new KinoError("INVALID_ARGUMENT", `${String(step).slice(0, 40)} is not a denoising step`, { field: "step" });
  return inside(jobFolder(dataDir, id), join(PREVIEWS_FOLDER, `${step}.png`));
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
