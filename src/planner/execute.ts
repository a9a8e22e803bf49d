/**
 * From a Plan to what the engine executes: the memory spec sent with `load` (placements and the VRAM
 * cap, enforced inside the engine process) and the job fields sent with `generate` (VAE decode mode,
 * CFG batching). The planner decides; engine/kino_engine/runtime/placement.py carries it out.
 */
import type { JobSpec, MemorySpec, PlacementSpec } from "../protocol/engine.ts";
import type { Placement, Plan } from "./plan.ts";

function placementSpec(p: Placement): PlacementSpec {
  return p.kind === "streamed"
    ? { kind: "streamed", residentBlocks: p.residentBlocks, prefetch: p.prefetch, source: p.source ?? "ram" }
    : { kind: p.kind };
}

/** The `memory` of the ModelSpec that loads the model for this plan; the cap is the plan's whole VRAM budget. */
export function memorySpecOf(plan: Plan): MemorySpec {
  return {
    textEncoder: placementSpec(plan.placement.textEncoder),
    transformer: placementSpec(plan.placement.transformer),
    vae: placementSpec(plan.placement.vae),
    vramBudget: Math.floor(plan.budget.vram),
  };
}

/** The job fields a plan sets: how the VAE decodes and whether guidance runs as one batch-2 forward. */
export function jobFieldsOf(plan: Plan): Pick<JobSpec, "vaeDecode" | "cfg"> {
  return {
    vaeDecode: plan.vaeDecode.mode === "full" ? { mode: "full" } : { mode: "tiled", tile: plan.vaeDecode.tile },
    ...(plan.cfg === "off" ? {} : { cfg: plan.cfg }),
  };
}

/** The runtime fields a plan sets: how the transformer's linears are stored. */
export function runtimeFieldsOf(plan: Plan): { weights: Plan["weights"] } {
  return { weights: plan.weights };
}

/** Whether two plans load the model the same way (placements and cap), so a loaded engine can serve both. */
export function sameMemory(a: MemorySpec, b: MemorySpec): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}
