/**
 * A job request checked and resolved into a submission, before anything is stored: the body's types,
 * the model's shape rules (the same checks as `kino generate`), the model (catalog ids and auto
 * only: a server does not load folders named by its clients), the defaults, a seed, how often it
 * previews, and admission through the planner.
 */
import { randomInt } from "node:crypto";
import { buildJob } from "../../api/generate.ts";
import { checkNumbers, defaultPreviewEvery, type ParsedGenerateOptions } from "../../api/generate-options.ts";
import { catalogIds, findCatalogModel, WAN21_1_3B_ID, WAN21_SHAPE, type CatalogModel } from "../../catalog/models.ts";
import { AUTO_MODEL, isModelPresent, pickAutoModel, resolveModel } from "../../catalog/resolve.ts";
import { KinoError } from "../../errors.ts";
import { parseInput } from "../http/validate.ts";
import { parseKeepAlive } from "../options.ts";
import { admit, type MachineFacts } from "../scheduler/admission.ts";
import { JobRequest, type JobParams } from "../schemas.ts";
import type { JobSubmission } from "./store.ts";

/**
 * @throws KinoError INVALID_ARGUMENT, UNKNOWN_MODEL, MODEL_NOT_DOWNLOADED, BAD_CHECKPOINT (field named),
 *   INFEASIBLE (the smallest budget named)
 */
export async function prepareSubmission(body: unknown, machine: MachineFacts, modelsDir: string): Promise<JobSubmission> {
  const request = parseInput(JobRequest, body, "body");
  const catalog = requestedModel(request.model);
  const { keepAlive, previewEvery, ...asked } = request;
  // The CLI's options minus what a server decides itself (device, outputs, compile).
  const options: ParsedGenerateOptions = { ...asked, compile: false, out: "" };
  checkNumbers(options, catalog?.shape ?? WAN21_SHAPE);
  checkPreviewEvery(previewEvery);
  const keepAliveMs = keepAlive === undefined ? null : parseKeepAlive(keepAlive, "keepAlive");
  if (catalog === null && request.randomWeights) {
    throw new KinoError("INVALID_ARGUMENT", "random weights need a catalog model named explicitly (wan2.1-t2v-1.3b or wan2.1-t2v-14b), not auto", {
      field: "randomWeights",
    });
  }
  const model = await resolveModel(
    { kind: "catalog", model: catalog ?? (await autoModel(machine, modelsDir)) },
    { modelsDir, randomWeights: request.randomWeights },
  );
  const seed = request.seed ?? randomInt(0, 2 ** 32);
  const { output: _output, ...params }: { output: unknown } & JobParams = buildJob(options, model, { video: "", framesDir: null }, seed);
  admit(model.id, params, machine);
  return {
    model: { name: model.name, path: model.path, randomWeights: model.randomWeights, tiny: model.tiny },
    params,
    dtype: request.dtype ?? null,
    keepAliveMs,
    previewEvery: previewEvery ?? defaultPreviewEvery(params.steps),
  };
}

/** @throws KinoError INVALID_ARGUMENT naming previewEvery unless it is absent or a whole number ≥ 0 */
function checkPreviewEvery(every: number | undefined): void {
  if (every !== undefined && !(Number.isSafeInteger(every) && every >= 0)) {
    throw new KinoError("INVALID_ARGUMENT", `must be a whole number ≥ 0: a preview every N denoising steps, 0 for none (default: every tenth of the steps); got ${every}`, {
      field: "previewEvery",
    });
  }
}

/**
 * The catalog model a request names; null for auto.
 * @throws KinoError UNKNOWN_MODEL naming the known ids
 */
export function requestedModel(id: string): CatalogModel | null {
  const catalog = id === AUTO_MODEL ? null : findCatalogModel(id);
  if (catalog === undefined) {
    throw new KinoError("UNKNOWN_MODEL", `unknown model "${id.slice(0, 100)}"; known ids: ${catalogIds().join(", ")} or auto (GET /api/models)`, {
      field: "model",
    });
  }
  return catalog;
}

/** "auto" as `kino generate` decides it, for the server's engines. */
export async function autoModel(machine: MachineFacts, modelsDir: string) {
  const pick = pickAutoModel({ hasGpu: machine.gpus.length > 0, wan13bPresent: await isModelPresent(modelsDir, WAN21_1_3B_ID) });
  const model = findCatalogModel(pick.id);
  if (model === undefined) throw new KinoError("INTERNAL", `auto picked ${pick.id}, which is not in the catalog`);
  return model;
}
