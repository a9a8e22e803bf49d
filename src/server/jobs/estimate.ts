/**
 * The planner's estimate for a request before it is submitted (POST /api/plan, the web UI's
 * estimate): peak VRAM and RAM and the time, planned on the server's largest GPU as admission would
 * plan it, or on the H100 profile where the server has no GPU (said in the note). kino's tiny model
 * is not planned: the planner models full-size architectures.
 */
import { planModel } from "../../api/plan.ts";
import { checkNumbers, parseSize, type ParsedGenerateOptions } from "../../api/generate-options.ts";
import { describeDecode, describePlacement, type Plan } from "../../planner/plan.ts";
import { parseInput } from "../http/validate.ts";
import { admit, type MachineFacts } from "../scheduler/admission.ts";
import { PlanBody, type JobParams, type PlanEstimate } from "../schemas.ts";
import { autoModel, requestedModel } from "./prepare.ts";

/** The profile a server without GPUs estimates on. */
const NO_GPU_PROFILE = "h100-80gb";

/** @throws KinoError INVALID_ARGUMENT (field named), UNKNOWN_MODEL, INFEASIBLE (the smallest budget named) */
export async function estimateJob(body: unknown, machine: MachineFacts, modelsDir: string): Promise<PlanEstimate> {
  const request = parseInput(PlanBody, body, "body");
  const model = requestedModel(request.model) ?? (await autoModel(machine, modelsDir));
  // The job checks minus the prompt, which planning does not read.
  const checked: ParsedGenerateOptions = { ...request, prompt: "-", compile: false, randomWeights: false, out: "" };
  checkNumbers(checked, model.shape);
  const d = model.defaults;
  const { width, height } = request.size === undefined ? d : parseSize(request.size, model.shape);
  const shape = { model: model.id, width, height, frames: request.frames ?? d.frames, steps: request.steps ?? d.steps };
  const guidance = request.guidance ?? d.guidance;
  if (model.architecture === null) {
    return { ...shape, hardware: null, serverGpu: false, estimate: null, note: `${model.id} is kino's test model: not planned (it is a few MB and runs in seconds)` };
  }
  if (machine.gpus.length > 0) {
    const params: JobParams = { ...shape, prompt: "", negativePrompt: "", guidance, shift: null, seed: 0, fps: null };
    const plan = admit(model.id, params, machine)!;
    return { ...shape, hardware: plan.hardware, serverGpu: true, estimate: estimateOf(plan), note: `planned on this server's ${plan.hardware}` };
  }
  const { plan } = planModel({ model: model.id, size: `${width}x${height}`, frames: shape.frames, steps: shape.steps, guidance, gpu: NO_GPU_PROFILE });
  return {
    ...shape,
    hardware: plan.hardware,
    serverGpu: false,
    estimate: estimateOf(plan),
    note: `this server has no GPU (its jobs run on the CPU, far slower): the estimate is for an ${plan.hardware}`,
  };
}

function estimateOf(plan: Plan): NonNullable<PlanEstimate["estimate"]> {
  return {
    peakVramBytes: plan.predicted.peakVram,
    peakRamBytes: plan.predicted.peakRam,
    seconds: plan.predicted.seconds,
    secondsPerStep: plan.predicted.secondsPerStep,
    transformer: describePlacement(plan.placement.transformer),
    decode: describeDecode(plan.vaeDecode),
  };
}
