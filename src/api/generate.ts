/**
 * Generates one video: the programmatic API behind `kino generate`. In order: check the request
 * (no engine yet), start an engine, decide what depends on the machine (auto model, device, dtype),
 * make the tiny model if it is the one and is missing, load, generate, close. Every automatic
 * decision is reported as a notice with its reason.
 */
import { randomBytes, randomInt } from "node:crypto";
import { renameSync, writeFileSync } from "node:fs";
import { mkdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import type { KinoConfig } from "../config/config.ts";
import {
  isModelPresent,
  modelSource,
  parseModelRef,
  pickAutoModel,
  resolveModel,
  type ModelRef,
  type ResolvedModel,
} from "../catalog/resolve.ts";
import { findCatalogModel, WAN21_1_3B_ID, WAN21_SHAPE } from "../catalog/models.ts";
import type { EngineClient, EngineFactory } from "../engine/client.ts";
import { KinoError, toKinoError } from "../errors.ts";
import type { Device, DeviceInfo, DType, EngineEvent, GenerateResult, HelloResult, JobSpec, LoadResult, ModelSpec } from "../protocol/engine.ts";
import { jobFieldsOf, memorySpecOf, runtimeFieldsOf } from "../planner/execute.ts";
import { reportedProfile } from "../planner/hardware.ts";
import { corrections, PeakLog, peakRecords } from "../planner/learn.ts";
import { checkpointManifest, withCheckpointFiles } from "../planner/checkpoint-manifest.ts";
import { probeKey, withMeasuredRates } from "../planner/probe-cache.ts";
import { probeCacheFor } from "./probe.ts";
import { modelManifest } from "../planner/manifest.ts";
import { DEFAULT_MARGIN, describeDecode, describePlacement, plan, type Plan } from "../planner/plan.ts";
import { parseByteSize, parseMemoryLevel, parseWeights } from "./plan.ts";
import {
  checkNumbers,
  checkOutputs,
  defaultPreviewEvery,
  DTYPE_NAMES,
  GenerateOptions,
  parseSize,
  type CheckedOutputs,
  type ParsedGenerateOptions,
} from "./generate-options.ts";

export interface GenerateDeps {
  readonly config: KinoConfig;
  readonly startEngine: EngineFactory;
  /** Makes kino's tiny checkpoint in a folder (the engine's make-tiny tool). */
  readonly makeTiny: (dir: string, signal?: AbortSignal) => Promise<unknown>;
  /** Relative paths are resolved against it. */
  readonly cwd: string;
}

export interface GenerateHooks {
  /** One-line messages about decisions and caveats ("the video is noise", the seed chosen …). */
  onNotice?: (message: string) => void;
  /** Engine events of load and generate, in order. */
  onEvent?: (event: EngineEvent) => void;
  /** Aborting cancels: the job stops between steps (or the engine is stopped mid-load); rejects with CANCELLED. */
  signal?: AbortSignal;
}

/** A request checked against everything knowable before an engine starts. */
export interface PreparedGenerate {
  readonly options: ParsedGenerateOptions;
  readonly ref: ModelRef;
  /** Null for "auto", decided once the engine says whether there is a GPU. */
  readonly model: ResolvedModel | null;
  readonly outputs: CheckedOutputs;
}

export interface GenerateOutcome {
  readonly model: {
    readonly name: string;
    readonly id: string | null;
    readonly path: string | null;
    /** Random weights (the tiny model or --random-weights): the video is noise. */
    readonly noise: boolean;
    readonly randomWeights: boolean;
    readonly auto: boolean;
  };
  readonly device: ModelSpec["device"];
  readonly dtype: ModelSpec["dtype"];
  readonly job: JobSpec;
  readonly load: LoadResult;
  readonly result: GenerateResult;
  /** The memory plan the run executed (null on CPU and for models without a full-size architecture). */
  readonly plan: Plan | null;
  /** Wall time of the whole call, engine start included. */
  readonly wallMs: number;
  /** Where the previews were written (the last one stays); null without --preview. */
  readonly preview: string | null;
}

/**
 * Checks a request without starting an engine: values, model, output paths.
 * @throws KinoError INVALID_ARGUMENT, UNKNOWN_MODEL, NOT_A_CHECKPOINT, MODEL_NOT_DOWNLOADED, BAD_CHECKPOINT …
 */
export async function prepareGenerate(input: GenerateOptions, deps: Pick<GenerateDeps, "config" | "cwd">): Promise<PreparedGenerate> {
  const parsed = GenerateOptions.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new KinoError("INVALID_ARGUMENT", issue?.message ?? "invalid request", { field: issue?.path.join(".") ?? null });
  }
  const options = parsed.data;
  const ref = await parseModelRef(options.model, deps.cwd);
  // Every model "auto" may pick is a Wan 2.1, so the shape rules are known before it is decided.
  checkNumbers(options, ref.kind === "auto" ? WAN21_SHAPE : shapeOf(ref));
  if (ref.kind === "auto" && options.randomWeights) {
    throw new KinoError("INVALID_ARGUMENT", "random weights need a catalog model named explicitly (wan2.1-t2v-1.3b or wan2.1-t2v-14b), not auto", {
      field: "randomWeights",
    });
  }
  const model =
    ref.kind === "auto" ? null : await resolveModel(ref, { modelsDir: deps.config.modelsDir, randomWeights: options.randomWeights });
  // Budget flags are checked now (their meaning on this machine waits for the engine's hello).
  if (options.vram !== undefined) parseByteSize(options.vram, "vram");
  parseWeights(options.precision);
  if (options.ram !== undefined) parseByteSize(options.ram, "ram");
  parseMemoryLevel(options.memoryLevel);
  const outputs = await checkOutputs(options, deps.cwd);
  return { options, ref, model, outputs };
}

export async function generateVideo(input: GenerateOptions, deps: GenerateDeps, hooks: GenerateHooks = {}): Promise<GenerateOutcome> {
  const started = performance.now();
  const prepared = await prepareGenerate(input, deps);
  const { signal } = hooks;
  const notice = (message: string) => hooks.onNotice?.(message);
  throwIfCancelled(signal);

  const engine = await deps.startEngine();
  try {
    const hello = await engine.hello();
    throwIfCancelled(signal);
    const model = prepared.model ?? (await decideAuto(hello, deps, notice));
    const { options } = prepared;
    if (model.tiny) notice(`${model.name} is kino's tiny model with random weights: the video is noise (it tests the pipeline)`);
    if (model.randomWeights) notice(`${model.name} with random weights: for timings only, the video is noise`);

    const { device, dtype, reason } = choosePlacement(options, hello.devices);
    if (reason !== null) notice(reason);
    const seed = options.seed ?? randomInt(0, 2 ** 32);
    if (options.seed === undefined) notice(`seed ${seed} (chosen at random; pass --seed ${seed} to repeat)`);

    const baseJob = buildJob(options, model, prepared.outputs, seed);
    const baseSpec: ModelSpec = {
      name: model.name,
      source: modelSource(model, seed),
      device,
      dtype,
      // Compiling pays off on long or repeated jobs (a persistent engine); a one-shot CLI run asks for it.
      runtime: { cfg: "auto", attention: "auto", compile: options.compile, cacheDir: join(deps.config.cache, "runtime") },
    };
    // A per-machine measurement: it lives in kino's home, beside the models (not in the shared download cache).
    const peaks = new PeakLog(join(deps.config.home, "planner", "peaks.jsonl"));
    const planned = await planRun(deps.config, options, model, baseJob, device, hello, peaks, DEFAULT_MARGIN);
    if (planned !== null) notice(describeRun(planned));
    if (model.needsMakeTiny && model.path !== null) await makeTinyOnce(model.path, deps, notice, signal);
    let job = planned === null ? baseJob : { ...baseJob, ...jobFieldsOf(planned) };
    const planSpec = (p: Plan): ModelSpec => ({ ...baseSpec, runtime: { ...baseSpec.runtime!, ...runtimeFieldsOf(p) }, memory: memorySpecOf(p) });
    let spec = planned === null ? baseSpec : planSpec(planned);
    throwIfCancelled(signal);
    let load = await cancellableLoad(engine, spec, hooks);
    throwIfCancelled(signal);
    let result: GenerateResult;
    let plan = planned;
    const onEvent = previewWriter(prepared.outputs.preview ?? null, hooks.onEvent, notice);
    try {
      result = await engine.generate(job, { onEvent, signal });
    } catch (err) {
      // Out of memory with a plan: the engine freed what it could; retry once with a safer plan
      // (a quarter of the budget kept free instead of a tenth), and say why.
      if (plan === null || toKinoError(err).code !== "OOM") throw err;
      const safer = await planRun(deps.config, options, model, baseJob, device, hello, peaks, OOM_RETRY_MARGIN);
      if (safer === null) throw err;
      notice(`out of memory during ${toKinoError(err).phase ?? "the run"}; retrying once with a safer plan (${Math.round(OOM_RETRY_MARGIN * 100)}% of the budget kept free): ${describeRun(safer)}`);
      plan = safer;
      job = { ...baseJob, ...jobFieldsOf(safer) };
      spec = planSpec(safer);
      load = await cancellableLoad(engine, spec, hooks);
      result = await engine.generate(job, { onEvent, signal });
    }
    if (plan !== null && result.phasePeakVramBytes != null) {
      // What this run measured corrects the next plans for this model on this GPU (planner/learn.ts).
      await peaks.append(peakRecords(plan, result.phasePeakVramBytes)).catch((e: Error) => notice(`could not record the measured peaks: ${e.message}`));
    }
    return {
      model: {
        name: model.name,
        id: model.id,
        path: model.path,
        noise: model.tiny || model.randomWeights,
        randomWeights: model.randomWeights,
        auto: prepared.ref.kind === "auto",
      },
      device,
      dtype,
      job,
      load,
      result,
      plan,
      wallMs: performance.now() - started,
      preview: prepared.outputs.preview ?? null,
    };
  } catch (err) {
    // A cancel that stopped the engine surfaces as ENGINE_CLOSED; the user asked for it, so say so.
    if (signal?.aborted && toKinoError(err).code !== "CANCELLED") throw new KinoError("CANCELLED", "cancelled", { cause: err });
    throw withRequestField(err);
  } finally {
    await engine.close();
  }
}

/** The margin of the retry after an out-of-memory error (the first plan keeps DEFAULT_MARGIN free). */
export const OOM_RETRY_MARGIN = 0.25;

/**
 * The memory plan for a run on the GPU, or null where there is nothing to plan (CPU, or a model
 * without a full-size architecture, e.g. the tiny one). The profile takes the rates `kino probe`
 * measured on this GPU (cached) or the H100 preset's, with the VRAM and RAM the engine reported; the
 * learned corrections for this model and GPU apply.
 * @throws KinoError INFEASIBLE naming the smallest budget, INVALID_ARGUMENT for a bad budget flag.
 */
export async function planRun(
  config: KinoConfig,
  options: ParsedGenerateOptions,
  model: ResolvedModel,
  job: JobSpec,
  device: Device,
  hello: HelloResult,
  peaks: PeakLog,
  margin: number,
): Promise<Plan | null> {
  const architecture = model.id === null ? null : (findCatalogModel(model.id)?.architecture ?? null);
  const gpu = hello.devices[0];
  // A catalog architecture, or the configs of a checkpoint folder (real weights); the tiny model is not planned.
  const plannable = architecture !== null || (model.path !== null && !model.tiny && !model.randomWeights);
  if (device !== "cuda" || gpu === undefined || !plannable) {
    if (options.vram !== undefined || options.memoryLevel !== undefined || options.precision !== undefined) {
      throw new KinoError(
        "INVALID_ARGUMENT",
        device !== "cuda" || gpu === undefined
          ? "--vram, --memory-level and --precision plan GPU runs; this run is on the CPU"
          : `${model.name} has no full-size architecture to plan (budgets apply to wan2.1-t2v-1.3b and wan2.1-t2v-14b)`,
        { field: options.vram !== undefined ? "vram" : options.memoryLevel !== undefined ? "memoryLevel" : "precision" },
      );
    }
    return null;
  }
  const manifest =
    architecture === null
      ? await checkpointManifest(model.path!, "model")
      : model.path === null
        ? modelManifest(model.id!, architecture)
        : await withCheckpointFiles(modelManifest(model.id!, architecture), model.path, "model"); // what a block read from disk takes
  // The rates this machine measured (`kino probe`, cached per GPU) where there are any, else the H100
  // preset's; VRAM and RAM are what the engine reports now. Reading the cache never measures.
  const probed = await probeCacheFor(config)
    .read(probeKey(hello), { quick: true })
    .catch(() => null);
  const reported = reportedProfile(gpu, hello.hostRamBytes);
  const hardware = probed?.result.device === "cuda" ? withMeasuredRates(reported, probed.result, manifest.transformer.shape.width) : reported;
  const records = await peaks.read().catch(() => []);
  const budget = {
    vram: options.vram === undefined ? undefined : parseByteSize(options.vram, "vram"),
    ram: options.ram === undefined ? undefined : parseByteSize(options.ram, "ram"),
    memoryLevel: parseMemoryLevel(options.memoryLevel),
    margin,
    weights: parseWeights(options.precision),
    corrections: corrections(records, manifest.id, hardware.name),
  };
  return plan(manifest, hardware, { width: job.width, height: job.height, frames: job.frames, steps: job.steps, guidance: job.guidance }, budget);
}

function describeRun(p: Plan): string {
  const gib = (b: number) => `${(b / 2 ** 30).toFixed(1)} GiB`;
  const t = p.placement;
  return (
    `plan: text encoder ${describePlacement(t.textEncoder)}, transformer ${describePlacement(t.transformer)}, VAE ${describePlacement(t.vae)}, ` +
    `decode ${describeDecode(p.vaeDecode)}, CFG ${p.cfg}` +
    (p.weights === "exact" ? "" : `, linears ${p.weights} (lossy: ${(p.weightsError * 100).toFixed(1)}% from exact)`) +
    `; predicted peak ${gib(p.predicted.peakVram)} of ${gib(p.budget.vram)}, ${p.predicted.secondsPerStep.toFixed(2)} s/step`
  );
}

/**
 * Device and precision: as asked, else cuda when the engine sees a GPU (bf16 there), else cpu
 * (fp32: bf16 matmuls on CPUs are slow or emulated). Pure; `reason` explains a decision made for the user.
 * @throws KinoError DEVICE_UNAVAILABLE for cuda without a GPU.
 */
export function choosePlacement(
  asked: Pick<ParsedGenerateOptions, "device" | "dtype">,
  gpus: readonly DeviceInfo[],
): { device: Device; dtype: DType; reason: string | null } {
  const device = asked.device ?? (gpus.length > 0 ? "cuda" : "cpu");
  if (device === "cuda" && gpus.length === 0) {
    throw new KinoError("DEVICE_UNAVAILABLE", "cuda was asked for but the engine sees no CUDA GPU; use --device cpu", { field: "device" });
  }
  const dtype = DTYPE_NAMES[asked.dtype ?? (device === "cuda" ? "bf16" : "fp32")];
  const reason =
    asked.device !== undefined
      ? null
      : `device ${device} (${dtype}): ${device === "cuda" ? `the engine sees ${gpus[0]?.name ?? "a GPU"}` : "the engine sees no CUDA GPU"}`;
  return { device, dtype, reason };
}

/**
 * The engine's events on to `onEvent`, with each preview also written to `path` (a temporary name,
 * then renamed over the last one, so a viewer never reads half a PNG). A failed write is said once
 * and the run goes on.
 */
export function previewWriter(path: string | null, onEvent: ((e: EngineEvent) => void) | undefined, notice: (m: string) => void): (e: EngineEvent) => void {
  if (path === null) return (e) => onEvent?.(e);
  const partial = `${path}.partial`;
  let failed = false;
  return (e) => {
    if (e.kind === "preview" && !failed) {
      try {
        writeFileSync(partial, Buffer.from(e.png, "base64"));
        renameSync(partial, path);
      } catch (err) {
        failed = true;
        notice(`could not write the preview ${path}: ${(err as Error).message}; the run goes on without it`);
      }
    }
    onEvent?.(e);
  };
}

/** The protocol's job: the request's values, the model's defaults for the rest. */
export function buildJob(options: ParsedGenerateOptions, model: ResolvedModel, outputs: CheckedOutputs, seed: number): JobSpec {
  const d = model.defaults;
  const { width, height } = options.size === undefined ? { width: d.width, height: d.height } : parseSize(options.size, model.shape);
  return {
    prompt: options.prompt,
    negativePrompt: options.negativePrompt ?? d.negativePrompt,
    width,
    height,
    frames: options.frames ?? d.frames,
    steps: options.steps ?? d.steps,
    guidance: options.guidance ?? d.guidance,
    shift: options.shift ?? d.shift,
    seed,
    fps: options.fps ?? null,
    output: { video: outputs.video, framesDir: outputs.framesDir },
    ...(outputs.preview == null ? {} : { preview: { every: options.previewEvery ?? defaultPreviewEvery(options.steps ?? d.steps) } }),
  };
}

async function decideAuto(hello: HelloResult, deps: GenerateDeps, notice: (m: string) => void): Promise<ResolvedModel> {
  const wan13bPresent = await isModelPresent(deps.config.modelsDir, WAN21_1_3B_ID);
  const pick = pickAutoModel({ hasGpu: hello.devices.length > 0, wan13bPresent });
  notice(`model auto → ${pick.id}: ${pick.reason}`);
  const model = findCatalogModel(pick.id);
  if (model === undefined) throw new KinoError("INTERNAL", `auto picked ${pick.id}, which is not in the catalog`);
  return resolveModel({ kind: "catalog", model }, { modelsDir: deps.config.modelsDir, randomWeights: false });
}

/**
 * Makes the tiny checkpoint under a temporary name and renames it into place, so an interrupted
 * make leaves nothing that looks finished, and two kinos making it at once both end up with one.
 */
async function makeTinyOnce(dir: string, deps: GenerateDeps, notice: (m: string) => void, signal?: AbortSignal): Promise<void> {
  notice(`making kino's tiny model in ${dir} (once; it takes a few seconds)`);
  await mkdir(deps.config.modelsDir, { recursive: true });
  const tmp = join(deps.config.modelsDir, `.tiny.tmp-${randomBytes(4).toString("hex")}`);
  try {
    await deps.makeTiny(tmp, signal);
    await rename(tmp, dir).catch(async (err: NodeJS.ErrnoException) => {
      // Another kino finished first: its copy is as good as ours.
      if (err.code !== "ENOTEMPTY" && err.code !== "EEXIST") throw err;
    });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/** Load has no in-protocol cancel (it is not a step loop): a cancel during it stops the engine. */
async function cancellableLoad(engine: EngineClient, spec: ModelSpec, hooks: GenerateHooks): Promise<LoadResult> {
  const stop = () => void engine.close();
  hooks.signal?.addEventListener("abort", stop, { once: true });
  try {
    return await engine.load(spec, { onEvent: hooks.onEvent });
  } finally {
    hooks.signal?.removeEventListener("abort", stop);
  }
}

/** The engine names fields of its protocol request; the user knows the fields of theirs. */
const ENGINE_FIELDS: Readonly<Record<string, string>> = {
  "job.output.video": "out",
  "job.output.framesDir": "framesDir",
  "job.width": "size",
  "job.height": "size",
  "job.frames": "frames",
  "job.steps": "steps",
  "job.guidance": "guidance",
  "job.shift": "shift",
  "job.seed": "seed",
  "job.fps": "fps",
  "job.prompt": "prompt",
  "job.negativePrompt": "negativePrompt",
  "model.device": "device",
  "model.dtype": "dtype",
  "model.source.path": "model",
  "model.source": "model",
};

function withRequestField(err: unknown): unknown {
  if (!(err instanceof KinoError) || err.field === null) return err;
  const field = ENGINE_FIELDS[err.field];
  if (field === undefined) return err;
  return new KinoError(err.code, err.message, { field, phase: err.phase, stderrTail: err.stderrTail, cause: err.cause });
}

function throwIfCancelled(signal?: AbortSignal): void {
  if (signal?.aborted) throw new KinoError("CANCELLED", "cancelled");
}

function shapeOf(ref: Exclude<ModelRef, { kind: "auto" }>) {
  return ref.kind === "catalog" ? ref.model.shape : WAN21_SHAPE;
}
