/**
 * The planner in the server. Admission: a job for a catalog model with a known architecture, on a
 * server with GPUs, is planned against the largest GPU before it is queued; one that fits nowhere is
 * refused at once (422 INFEASIBLE) with the smallest VRAM budget that would work. Execution: the
 * engine that takes the job plans it again for its own GPU, and loads and generates with that plan
 * (planner/execute.ts). Jobs on CPU engines and of kino's tiny model are not planned (the planner
 * models GPUs and full-size architectures).
 *
 * Batching: jobs of one shape share one plan (the same placements, decode and CFG); `batchRoom`
 * says how many of them that plan has room for on a GPU.
 *
 * The hardware profile is built from what the engine reported (`hello`: total and free VRAM, host
 * RAM); the rates are the H100 preset's until the engine measures them (`probe`). Rates change the
 * predicted times and the choice among fitting plans, never whether a plan fits.
 */
import { findCatalogModel } from "../../catalog/models.ts";
import { KinoError, toKinoError } from "../../errors.ts";
import type { DeviceInfo } from "../../protocol/engine.ts";
import { GiB, reportedProfile, type HardwareProfile } from "../../planner/hardware.ts";
import { modelManifest } from "../../planner/manifest.ts";
import { learnedPeaks } from "../../planner/learn.ts";
import { measuredProfiles } from "../../planner/probe-cache.ts";
import { activationBytes, DEFAULT_MARGIN, DENOISE_OVERHEAD, plan, smallestVramBudget, type Plan, type PlanRequest } from "../../planner/plan.ts";
import type { JobParams } from "../schemas.ts";

export interface MachineFacts {
  /** The GPUs of the server's engines (empty: CPU engines only). */
  readonly gpus: readonly DeviceInfo[];
  /** Host memory the engine reported, null when unknown. */
  readonly hostRamBytes: number | null;
}

/** A planner profile for a GPU an engine reported, with its measured rates where it was probed (kino serve probes each GPU model once). */
export function hardwareFor(gpu: DeviceInfo, hostRamBytes: number | null): HardwareProfile {
  return measuredProfiles.apply(reportedProfile(gpu, hostRamBytes), gpu.name);
}

/**
 * Plans a job on one GPU, keeping `margin` of its free VRAM unused; null where there is nothing to
 * plan (no GPU, or a model without an architecture).
 * @throws KinoError INFEASIBLE naming the smallest VRAM budget that works.
 */
export function planOn(modelId: string | null, params: JobParams, gpu: DeviceInfo | undefined, hostRamBytes: number | null, margin = DEFAULT_MARGIN): Plan | null {
  const model = modelId === null ? undefined : findCatalogModel(modelId);
  if (model?.architecture == null || gpu === undefined) return null;
  const hardware = hardwareFor(gpu, hostRamBytes);
  const manifest = modelManifest(model.id, model.architecture);
  const request: PlanRequest = { width: params.width, height: params.height, frames: params.frames, steps: params.steps, guidance: params.guidance };
  // The peaks this server's runs (and kino generate's) measured for this model on this GPU correct the prediction.
  const budget = { margin, corrections: learnedPeaks.correctionsFor(manifest.id, hardware.name) };
  try {
    return plan(manifest, hardware, request, budget);
  } catch (err) {
    const e = toKinoError(err);
    if (e.code !== "INFEASIBLE" || e.field !== "vram") throw e;
    const need = smallestVramBudget(manifest, hardware, request, budget) / GiB;
    throw new KinoError(
      "INFEASIBLE",
      `${model.id} at ${params.width}x${params.height}x${params.frames} does not fit on ${gpu.name}, which has ` +
        `${(gpu.freeBytes / GiB).toFixed(1)} GiB free: the smallest plan needs a ${need.toFixed(1)} GiB VRAM budget; ask for a smaller size or fewer frames`,
      { cause: err },
    );
  }
}

/**
 * Admission: plans the job on the server's largest GPU.
 * @throws KinoError INFEASIBLE naming the smallest budget that works.
 */
export function admit(modelId: string | null, params: JobParams, machine: MachineFacts): Plan | null {
  const largest = machine.gpus.reduce<DeviceInfo | undefined>((a, b) => (a === undefined || b.freeBytes > a.freeBytes ? b : a), undefined);
  return planOn(modelId, params, largest, machine.hostRamBytes);
}

/**
 * How many jobs of this shape an engine on `gpu` runs as one batch, `limit` at most. A batch runs on
 * one job's plan; what grows with it is the denoising loop's working set, one job's activations per
 * job (the planner's `activationBytes` at the plan's tokens and CFG rows, corrected as the plan's
 * denoise peak is); the text encode and the decode run job by job and do not grow. So the plan has
 * room for 1 + ⌊(usable VRAM − predicted denoise peak) / one job's activations⌋ jobs. Jobs that are
 * not planned (a CPU engine, kino's tiny model) take `limit`; a job that does not plan here at all
 * runs alone (its run reports why).
 */
export function batchRoom(modelId: string | null, params: JobParams, gpu: DeviceInfo | undefined, hostRamBytes: number | null, limit: number): number {
  if (limit <= 1) return 1;
  let p: Plan | null;
  try {
    p = planOn(modelId, params, gpu, hostRamBytes);
  } catch {
    return 1;
  }
  const model = modelId === null ? undefined : findCatalogModel(modelId);
  if (p === null || model?.architecture == null) return limit;
  const rows = p.cfg === "batched" ? 2 : 1;
  const perJob = (activationBytes(modelManifest(model.id, model.architecture), p.tokens, rows) - DENOISE_OVERHEAD) * (p.corrections.denoise ?? 1);
  const room = 1 + Math.floor((p.budget.usableVram - p.predicted.phases.denoise.vram) / perJob);
  return Math.max(1, Math.min(limit, room));
}
