/**
 * `kino profile`: one warm generation of a random-weight model under torch.profiler, a Chrome trace
 * (chrome://tracing, Perfetto) and a digest of where the time went: device time by category, the top
 * kernels, and per denoising step the host syncs and device allocations that keep a loop from
 * running ahead of the GPU.
 *
 * The control plane builds the spec (the same model and job as `kino bench`, see randomRun) and
 * reads the digest; the engine's `kino_engine.profile` tool runs and measures. GPU-only fields are
 * null on the CPU.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { z } from "zod";
import type { KinoConfig } from "../config/config.ts";
import { runEngineTool, type ToolOptions } from "../engine/tools.ts";
import { KinoError } from "../errors.ts";
import { ModelSpec, RuntimeSpec } from "../protocol/engine.ts";
import { parseOptions, ProvenanceSchema, RandomRunOptions, randomRun, RunJob, type Provenance } from "./bench.ts";

export const ProfileOptions = RandomRunOptions.extend({
  /** Steps of the untimed warm-up generation (same prompts: the profiled one is a warm request). @default 1 */
  warmupSteps: z.number().int().positive().default(1),
  /** Profile the compiled hot path (regional torch.compile; compiled during the warm-up). @default false */
  compile: z.boolean().default(false),
  /** The attention backend ("auto" measures once per GPU and shape). @default auto */
  attention: RuntimeSpec.shape.attention.default("auto"),
  /** Where the attention choice and compiled kernels persist; null persists nothing. @default null */
  cacheDir: z.string().nullable().default(null),
});
export type ProfileOptions = z.input<typeof ProfileOptions>;

/** What the engine's profile tool takes: the bench spec's model and job, a warm-up, provenance. */
export const ProfileSpec = z.object({
  model: ModelSpec,
  job: RunJob,
  warmupSteps: z.number().int().positive(),
  provenance: ProvenanceSchema,
});
export type ProfileSpec = z.infer<typeof ProfileSpec>;

const Ms = z.number();
const StepDigest = z.object({
  /** 1-based step number (the first step, with its one-time work, is not reported). */
  step: z.number().int().positive(),
  ms: Ms,
  /** cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize / synchronous cudaMemcpy calls; null on the CPU. */
  hostSyncs: z.number().int().nonnegative().nullable(),
  syncsByName: z.record(z.string(), z.number()).nullable(),
  /** aten::item / _local_scalar_dense: device values read on the host (each one a sync on a GPU). */
  scalarReads: z.number().int().nonnegative(),
  /** Growth of the CUDA caching allocator's counters during the step; null on the CPU. */
  allocations: z.object({ requests: z.number(), cudaMallocs: z.number(), retries: z.number() }).nullable(),
});

export const ProfileDigest = z.object({
  device: z.enum(["cuda", "cpu"]),
  categories: z.object({
    wallMs: Ms,
    gpuKernelMs: Ms.nullable(),
    memcpyMs: z.object({ h2d: Ms, d2h: Ms, d2d: Ms }).nullable(),
    memsetMs: Ms.nullable(),
    /** Time inside top-level CPU ops (nested ones counted once). */
    cpuOpsMs: Ms,
    /** Wall time during which no kernel, copy or memset ran on the device. */
    gpuIdleMs: Ms.nullable(),
  }),
  phasesMs: z.object({ text_encode: Ms.nullable(), denoise: Ms.nullable(), decode: Ms.nullable() }),
  topKernels: z.array(z.object({ name: z.string(), calls: z.number().int(), totalMs: Ms, percent: z.number() })).nullable(),
  stepsProfiled: z.number().int().nonnegative(),
  steps: z.array(StepDigest),
  /** Prompt embeddings of the profiled generation served from the cache (hits) or encoded. */
  promptCache: z.object({ hits: z.number().int(), misses: z.number().int() }),
});
export type ProfileDigest = z.infer<typeof ProfileDigest>;

/** What the engine's profile tool answers. */
export const ProfileRaw = z.looseObject({
  environment: z.looseObject({ torch: z.string(), gpu: z.string().optional() }),
  spec: ProfileSpec,
  loadS: z.number(),
  /** Absolute path of the Chrome trace; null when none was asked for. */
  trace: z.string().nullable(),
  digest: ProfileDigest,
});
export type ProfileRaw = z.infer<typeof ProfileRaw>;

/** The engine spec for `options`: the same model and job `kino bench` would run. */
export function profileSpec(input: ProfileOptions, provenance: Provenance): ProfileSpec {
  const o = parseOptions(ProfileOptions, input);
  const { model, job } = randomRun(o);
  const runtime = { cfg: "auto", attention: o.attention, compile: o.compile, cacheDir: o.cacheDir } as const;
  return ProfileSpec.parse({ model: { ...model, runtime }, job, warmupSteps: o.warmupSteps, provenance });
}

/** Runs the engine's profile tool on this machine; `trace` is where the Chrome trace goes (none when omitted). */
export async function runProfile(
  config: KinoConfig,
  spec: ProfileSpec,
  trace: string | null,
  options: ToolOptions = {},
): Promise<ProfileRaw> {
  const scratch = await mkdtemp(join(tmpdir(), "kino-profile-"));
  try {
    const specPath = join(scratch, "spec.json");
    await writeFile(specPath, JSON.stringify(spec));
    const args = ["--spec", specPath, ...(trace === null ? [] : ["--trace", trace])];
    const answer = await runEngineTool(config, args, { ...options, module: "kino_engine.profile" });
    const parsed = ProfileRaw.safeParse(answer.result);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      throw new KinoError("INTERNAL", `the engine's profile tool answered something else than a digest: ${issue?.path.join(".")}: ${issue?.message}`);
    }
    return parsed.data;
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}
