/**
 * From a job's submission to what an engine loads and runs: the ModelSpec for an engine's device,
 * the JobSpec with its output path, and the keys the scheduler compares jobs by.
 */
import { choosePlacement } from "../../api/generate.ts";
import { findCatalogModel } from "../../catalog/models.ts";
import { KinoError } from "../../errors.ts";
import { jobFieldsOf, memorySpecOf } from "../../planner/execute.ts";
import type { Plan } from "../../planner/plan.ts";
import type { DeviceInfo, JobSpec, ModelSpec } from "../../protocol/engine.ts";
import type { JobSubmission } from "../jobs/store.ts";

/**
 * Which loaded model a job can run on without a load: the same weights in the same precision. An
 * engine's device is fixed, so it is not part of the key.
 */
export function modelIdentity(s: JobSubmission): string {
  return JSON.stringify([s.model.name, s.model.path, s.model.randomWeights, s.dtype]);
}

/**
 * Jobs with equal keys could share one batched forward (see policy.ts `selectBatch`). Previews are
 * not part of it: the engine takes them per job within a batch.
 */
export function batchKey(s: JobSubmission): string {
  const p = s.params;
  return JSON.stringify([modelIdentity(s), p.width, p.height, p.frames, p.steps, p.guidance, p.shift]);
}

/** Random weights are built from a fixed seed on the server, so one loaded copy serves every job. */
const SERVER_WEIGHT_SEED = 0;

/**
 * The model spec for an engine that sees `gpus` (none: a CPU engine), with the plan's memory
 * placements where the job was planned. Compile only when the server was asked for it (`kino serve
 * --compile`): its first job of each shape pays for it (a prewarm can pay instead), and the runtime
 * cache folder keeps the attention choice and the compiled kernels warm across processes.
 */
export function modelSpecFor(s: JobSubmission, gpus: readonly DeviceInfo[], cacheDir: string, plan: Plan | null, compile = false): ModelSpec {
  const { device, dtype } = choosePlacement({ device: gpus.length > 0 ? "cuda" : "cpu", dtype: s.dtype ?? undefined }, gpus);
  let source: ModelSpec["source"];
  if (s.model.randomWeights) {
    const architecture = findCatalogModel(s.model.name)?.architecture ?? null;
    if (architecture === null) throw new KinoError("INTERNAL", `${s.model.name} has no architecture for random weights`);
    source = { kind: "random", architecture, seed: SERVER_WEIGHT_SEED };
  } else {
    if (s.model.path === null) throw new KinoError("INTERNAL", `${s.model.name} has no checkpoint path`);
    source = { kind: "checkpoint", path: s.model.path };
  }
  return {
    name: s.model.name,
    source,
    device,
    dtype,
    runtime: { cfg: "auto", attention: "auto", compile, cacheDir },
    ...(plan === null ? {} : { memory: memorySpecOf(plan) }),
  };
}

/** Whether an engine that loaded `a` can run a job that needs `b` without loading again. */
export function sameLoad(a: ModelSpec, b: ModelSpec): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** What the engine runs: the job's parameters, its video (null: none, as a prewarm writes nothing), the plan's job fields and its previews (where it has any). */
export function jobSpecFor(s: JobSubmission, video: string | null, plan: Plan | null): JobSpec {
  return {
    ...s.params,
    output: { video, framesDir: null },
    ...(plan === null ? {} : jobFieldsOf(plan)),
    ...(s.previewEvery > 0 ? { preview: { every: s.previewEvery } } : {}),
  };
}
