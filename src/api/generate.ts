/**
 * Generates one video: the programmatic API behind `kino generate`. In order: check the request
 * (no engine yet), start an engine, decide what depends on the machine (auto model, device, dtype),
 * make the tiny model if it is the one and is missing, load, generate, close. Every automatic
 * decision is reported as a notice with its reason.
 */
import { randomBytes, randomInt } from "node:crypto";
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
import {
  checkNumbers,
  checkOutputs,
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
  /** Wall time of the whole call, engine start included. */
  readonly wallMs: number;
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
    if (model.needsMakeTiny && model.path !== null) await makeTinyOnce(model.path, deps, notice, signal);

    const { device, dtype, reason } = choosePlacement(options, hello.devices);
    if (reason !== null) notice(reason);
    const seed = options.seed ?? randomInt(0, 2 ** 32);
    if (options.seed === undefined) notice(`seed ${seed} (chosen at random; pass --seed ${seed} to repeat)`);

    const job = buildJob(options, model, prepared.outputs, seed);
    const spec: ModelSpec = {
      name: model.name,
      source: modelSource(model, seed),
      device,
      dtype,
      // Compiling pays off on long or repeated jobs (a persistent engine); a one-shot CLI run asks for it.
      runtime: { cfg: "auto", attention: "auto", compile: options.compile, cacheDir: join(deps.config.cache, "runtime") },
    };
    throwIfCancelled(signal);
    const load = await cancellableLoad(engine, spec, hooks);
    throwIfCancelled(signal);
    const result = await engine.generate(job, { onEvent: hooks.onEvent, signal });
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
      wallMs: performance.now() - started,
    };
  } catch (err) {
    // A cancel that stopped the engine surfaces as ENGINE_CLOSED; the user asked for it, so say so.
    if (signal?.aborted && toKinoError(err).code !== "CANCELLED") throw new KinoError("CANCELLED", "cancelled", { cause: err });
    throw withRequestField(err);
  } finally {
    await engine.close();
  }
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
