/**
 * The planner: where each component lives, how CFG is batched and how the VAE decodes, for one
 * request on one machine under a memory budget. A pure function of the model manifest, the hardware
 * profile, the request and the budget; it enumerates the candidate plans (a few thousand), predicts
 * each one's peak VRAM, peak host RAM and time per phase, and keeps the fastest that fits.
 *
 * It knows nothing of weights or of the engine: the engine does not execute plans yet (issue 4,
 * item 3), and the predictions are not corrected by measurements yet (item 4).
 *
 * Cost model (every constant below says where it comes from):
 * - compute per forward from the floor's FLOP formulas (engine/kino_engine/floor.py): linear
 *   N·(12d² + 4df) + 4Ld², attention 4N²d + 4NLd per block, at the profile's GEMM and attention rates,
 *   times the measured overhead of kino's forward over that floor;
 * - a block-streamed block costs max(compute, bytes / H2D) (the prefetch overlaps), and the first
 *   streamed block's copy is not hidden when no block is resident; streamed from disk, the copy is
 *   max(file bytes / disk read rate, bytes / H2D) (the reader fills one staging buffer while the
 *   other crosses the bus), and host RAM holds the two staging buffers instead of the blocks;
 * - a component swapped in per phase costs its bytes / H2D once per generation (the host copy is
 *   kept, so nothing is copied back);
 * - memory: weights on the device in each phase + that phase's working set + a fixed runtime overhead.
 */
import { KinoError } from "../errors.ts";
import { GiB, type HardwareProfile } from "./hardware.ts";
import { withWeights, type ModelManifest, type WeightMode } from "./manifest.ts";

export interface PlanRequest {
  readonly width: number;
  readonly height: number;
  readonly frames: number;
  readonly steps: number;
  /** Classifier-free guidance scale; above 1 the conditional and unconditional passes both run. */
  readonly guidance: number;
}

export type MemoryLevel = 0 | 1 | 2 | 3;

export interface PlanBudget {
  /** Bytes of VRAM the plan may use; capped at the profile's free VRAM. @default the profile's free VRAM */
  readonly vram?: number;
  /** Bytes of host RAM the plan may use. @default the profile's host RAM */
  readonly ram?: number;
  /** A preset (0: all resident … 3: transformer streamed) or "auto" (the planner chooses). @default "auto" */
  readonly memoryLevel?: MemoryLevel | "auto";
  /** Fraction of the VRAM budget kept free for what the model does not predict. @default 0.1 */
  readonly margin?: number;
  /**
   * The transformer's block linears: "exact", a low-bit mode, or "auto" (exact when it fits, else the
   * lowest-error low-bit mode that does). Low-bit modes are lossy; each carries its measured error.
   * @default "exact"
   */
  readonly weights?: WeightMode | "auto";
  /**
   * Factors on each phase's predicted peak VRAM, learned from the peaks measured on this machine
   * (planner/learn.ts). @default none (1)
   */
  readonly corrections?: PhaseCorrections;
}

export type Placement =
  /** On the device for the whole generation. */
  | { readonly kind: "resident" }
  /** On the device only during its phase (text encode, denoise or decode); in pinned host memory otherwise. */
  | { readonly kind: "swapped" }
  /**
   * Transformer only: the rest and `residentBlocks` blocks stay; the others are copied in `prefetch` ahead, from
   * pinned host RAM or, when RAM cannot hold them, read from the weight files on disk. @default source "ram"
   */
  | { readonly kind: "streamed"; readonly residentBlocks: number; readonly prefetch: number; readonly source?: "ram" | "disk" }
  /** Runs on the host CPU (text encoder only). */
  | { readonly kind: "cpu" };

export type VaeDecode = { readonly mode: "full" } | { readonly mode: "tiled"; readonly tile: number };

/** "batched": one batch-2 forward per step; "sequential": two batch-1 forwards; "off": guidance ≤ 1. */
export type CfgMode = "batched" | "sequential" | "off";

export type PlanPhase = "textEncode" | "denoise" | "decode";
export type PhaseCorrections = Readonly<Partial<Record<PlanPhase, number>>>;
export const PLAN_PHASES: readonly PlanPhase[] = ["textEncode", "denoise", "decode"];

export interface PhasePrediction {
  /** Peak device bytes during the phase. */
  readonly vram: number;
  readonly seconds: number;
}

export interface Plan {
  readonly model: string;
  readonly hardware: string;
  readonly request: PlanRequest;
  readonly memoryLevel: MemoryLevel | "auto";
  readonly placement: { readonly textEncoder: Placement; readonly transformer: Placement; readonly vae: Placement };
  readonly cfg: CfgMode;
  readonly vaeDecode: VaeDecode;
  /** Video tokens per forward (latent frames × latent height / 2 × latent width / 2). */
  readonly tokens: number;
  /**
   * The most weight bytes on the device at once, over the phases: resident components, a swapped
   * component during its phase, a streamed transformer's rest, resident blocks and prefetch buffers.
   */
  readonly residentBytes: number;
  /** Weight bytes held in pinned host memory (swapped and streamed). */
  readonly pinnedBytes: number;
  readonly budget: { readonly vram: number; readonly usableVram: number; readonly ram: number; readonly margin: number };
  readonly predicted: {
    readonly peakVram: number;
    readonly peakRam: number;
    readonly seconds: number;
    readonly secondsPerStep: number;
    readonly phases: Readonly<Record<PlanPhase, PhasePrediction>>;
  };
  /** How the transformer's block linears are stored (the engine's RuntimeOptions.weights). */
  readonly weights: WeightMode;
  /** The relative L2 error of a forward in that mode against exact, as measured (0 for exact). */
  readonly weightsError: number;
  /** The learned factors applied to the phases' predicted peaks (empty: none). */
  readonly corrections: PhaseCorrections;
  /** Every decision with its reason, in the order they were made. */
  readonly reasons: readonly string[];
}

// ---- calibration constants -------------------------------------------------------------------
//
// Fitted per phase to the memory matrix measured on an H100 with kino's engine executing the plans
// (`kino bench-memory`, docs/benchmarks/*-memory-*.json: 1.3B and 14B at 832×480 and 1280×720, every
// placement the planner chose under 8–80 GB). Peaks are torch's allocated bytes.

/** Device bytes beyond weights and working set while the text encoder runs (workspaces, embeddings). */
export const TEXT_OVERHEAD = 0.35 * GiB;

/**
 * The denoise peak beyond weights, per batch element: bf16 tensors of N × (3.35 d + 1.0 f) (the
 * residual stream, q/k/v, attention output and norm copies of width d; the FFN's intermediate of
 * width f), plus 0.4 GiB (latents, embeddings, guidance buffers, workspaces). Solved from the four
 * batch-2 resident peaks (1.3B and 14B at 480p and 720p); it then predicts the batch-1 (sequential
 * CFG) peaks of the 14B within 0.25 GiB.
 */
export const ACTIVATION_WIDTHS = { model: 3.35, ffn: 1.0 } as const;
export const DENOISE_OVERHEAD = 0.4 * GiB;

/** Live bf16 (tokens, d_model) tensors per prompt in the text encoder's forward (an estimate; small). */
const TEXT_ACTIVATION_TENSORS = 20;

/**
 * The VAE's decode, everything beyond weights, as a line in the output's megapixels per frame (81
 * frames; kino decodes latent frame by latent frame, so frames barely matter): full decode 8.72 GiB
 * at 832×480 and 19.72 GiB at 1280×720; time 3.3 s and 7.8 s (float32 VAE, H100).
 */
const VAE_FULL = { base: 0.32 * GiB, perMegapixel: 21.04 * GiB, secondsPerMegapixel: 8.3, frames: 81, gemmFlops: 770e12 };

/**
 * Tiled decode (diffusers' tiling: overlapping tiles, every frame of a tile at once, the output
 * kept): 256 px tiles measured at 2.21 GiB beyond weights at 832×480 and 4.27 GiB at 1280×720,
 * 2.0× the full decode's time (2.13× at 480p, 1.73× at 720p). 128 px tiles are an estimate, not
 * measured: a smaller tile working set, the same kept output, more overlap recomputed.
 */
export const VAE_TILES: ReadonlyArray<{ readonly tile: number; readonly base: number; readonly perMegapixel: number; readonly slowdown: number }> = [
  { tile: 256, base: 0.64 * GiB, perMegapixel: 3.94 * GiB, slowdown: 2.0 },
  { tile: 128, base: 0.35 * GiB, perMegapixel: 3.94 * GiB, slowdown: 3.0 },
];

/**
 * A swapped component's copy onto the device runs tensor by tensor from one pinned buffer: measured
 * 11.4 GB (UMT5-XXL) in 0.48 s, 24 GB/s, 0.43 of the pinned copy rate.
 */
const SWAP_COPY_EFFICIENCY = 0.43;

/** kino's compiled forward over the floor: 1.175× at 1.3B, 1.05× at 14B (docs/benchmarks.md). */
const FORWARD_OVER_FLOOR = 1.1;

/**
 * Time per forward that does not grow with the batch (launches, host work, the scheduler): why one
 * batch-2 forward beats two batch-1 forwards (kino 1.059 s per step against diffusers compiled's
 * 1.069 s, docs/benchmarks.md).
 */
const FORWARD_FIXED_SECONDS = 0.01;

/**
 * One batch-2 forward (batched CFG) over two batch-1 forwards, as a line in the work of one sample's
 * forward, tokens × width, through three H100 measurements (docs/benchmarks.md): 0.993 at 1.3B 480p
 * (tokens × width 5.0e7), 1.008 at 14B 480p (1.7e8), 1.022 at 14B 720p (3.9e8, alternated runs of the
 * same compiled blocks). Batching pays where one sample leaves the GPU underused and costs a little
 * where it is saturated (attention at 151 200 rows runs slower than twice at 75 600).
 */
export function batchedCfgFactor(tokens: number, width: number): number {
  return BATCHED_CFG.base + BATCHED_CFG.perWork * tokens * width;
}
const BATCHED_CFG = { base: 0.99, perWork: 8.3e-11 } as const;

/** Per streamed block and forward: recording and waiting on the copy's event, launching the copy. An estimate, not yet measured. */
const STREAM_BLOCK_SECONDS = 0.001;

/**
 * Per low-bit mode: the linears' speed-up and a forward's relative L2 error against exact, measured on
 * the H100 (docs/benchmarks.md: FP8 GEMMs 1.26–1.44× compiled at Wan 14B shapes, a whole 14B 720p
 * forward 1.05× at 4.4% error; the weight-only modes dequantize on use and run at bf16 speed, their
 * errors are the GEMM-level ones, a forward's not yet measured). Auto tries them in this order.
 */
export const WEIGHT_COSTS: Readonly<Record<WeightMode, { readonly linearSpeedup: number; readonly error: number; readonly basis: string }>> = {
  exact: { linearSpeedup: 1, error: 0, basis: "exact" },
  int8: { linearSpeedup: 1, error: 0.0092, basis: "a linear layer's output, measured" },
  "int8-dynamic": { linearSpeedup: 1, error: 0.0127, basis: "a linear layer's output, measured" },
  "fp8-weight": { linearSpeedup: 1, error: 0.0266, basis: "a linear layer's output, measured" },
  fp8: { linearSpeedup: 1.35, error: 0.044, basis: "a 14B forward's output, measured" },
};

/** Host bytes of the Python process with torch and CUDA loaded, before any weights. */
const HOST_BASE = 3 * GiB;

/** Block-sized pinned buffers a transformer streamed from disk reads into (kino_engine/runtime/disk.py's STAGING_BUFFERS). */
export const DISK_STAGING_BUFFERS = 2;

export const DEFAULT_MARGIN = 0.1;

// ---- the cost model --------------------------------------------------------------------------

interface Candidate {
  readonly textEncoder: Placement;
  readonly transformer: Placement;
  readonly vae: Placement;
  readonly cfg: CfgMode;
  readonly vaeDecode: VaeDecode;
}

interface Evaluated extends Candidate {
  readonly phases: Record<PlanPhase, PhasePrediction>;
  readonly peakVram: number;
  readonly peakRam: number;
  readonly pinnedBytes: number;
  readonly residentBytes: number;
  readonly seconds: number;
  readonly secondsPerStep: number;
  readonly blockCompute: number;
  readonly blockTransfer: number;
}

const RESIDENT: Placement = { kind: "resident" };
const fromDisk = (p: Placement): boolean => p.kind === "streamed" && p.source === "disk";
const SWAPPED: Placement = { kind: "swapped" };
const CPU: Placement = { kind: "cpu" };

/** Video tokens per forward: the VAE compresses 8× in space and 4× in time, the patch 2×2 more. */
export function videoTokens(m: ModelManifest, r: PlanRequest): number {
  const [pt, ph, pw] = m.transformer.shape.patch;
  const latentFrames = Math.floor((r.frames - 1) / 4) + 1;
  return Math.ceil(latentFrames / pt) * Math.floor(r.height / 8 / ph) * Math.floor(r.width / 8 / pw);
}

/** FLOPs of one block's forward at batch 1: [linear, attention] (floor.py's formulas). */
export function blockFlops(m: ModelManifest, tokens: number): { linear: number; attention: number } {
  const { width: d, ffnWidth: f } = m.transformer.shape;
  const L = m.textEncoder.tokens;
  return {
    linear: tokens * (12 * d * d + 4 * d * f) + 4 * L * d * d,
    attention: 4 * tokens * tokens * d + 4 * tokens * L * d,
  };
}

/** Device bytes of the transformer's activations at the peak of one forward. */
export function activationBytes(m: ModelManifest, tokens: number, batch: number): number {
  const { width, ffnWidth } = m.transformer.shape;
  return batch * tokens * 2 * (ACTIVATION_WIDTHS.model * width + ACTIVATION_WIDTHS.ffn * ffnWidth) + DENOISE_OVERHEAD;
}

/** Device bytes of the VAE's decode beyond its weights. */
function decodeBytes(r: PlanRequest, decode: VaeDecode): number {
  const mpx = (r.width * r.height) / 1e6;
  if (decode.mode === "full") return VAE_FULL.base + VAE_FULL.perMegapixel * mpx;
  const tile = VAE_TILES.find((t) => t.tile === decode.tile)!;
  return tile.base + tile.perMegapixel * mpx;
}

function decodeSeconds(r: PlanRequest, hw: HardwareProfile, decode: VaeDecode): number {
  const full = VAE_FULL.secondsPerMegapixel * ((r.width * r.height) / 1e6) * (r.frames / VAE_FULL.frames) * (VAE_FULL.gemmFlops / hw.gemmFlops);
  return decode.mode === "full" ? full : full * VAE_TILES.find((t) => t.tile === decode.tile)!.slowdown;
}

function evaluate(m: ModelManifest, hw: HardwareProfile, r: PlanRequest, c: Candidate, corrections: PhaseCorrections = {}): Evaluated {
  const tokens = videoTokens(m, r);
  const prompts = c.cfg === "off" ? 1 : 2;
  const batch = c.cfg === "batched" ? 2 : 1;
  const forwardsPerStep = c.cfg === "sequential" ? 2 : 1;
  const t = m.transformer;
  const layers = t.shape.layers;

  const onDevice = (bytes: number, p: Placement, own: PlanPhase, phase: PlanPhase): number => {
    switch (p.kind) {
      case "resident":
        return bytes;
      case "swapped":
        return phase === own ? bytes : 0;
      case "cpu":
        return 0;
      case "streamed":
        // The engine holds prefetch + 1 slots (the computing block and those copied ahead), during the phase only.
        return t.restBytes + p.residentBlocks * t.blockBytes + (phase === own ? (p.prefetch + 1) * t.blockBytes : 0);
    }
  };
  const weights = (phase: PlanPhase) =>
    onDevice(m.textEncoder.bytes, c.textEncoder, "textEncode", phase) +
    onDevice(t.bytes, c.transformer, "denoise", phase) +
    onDevice(m.vae.bytes, c.vae, "decode", phase);
  const swapIn = (bytes: number, p: Placement) => (p.kind === "swapped" ? bytes / (hw.h2d * SWAP_COPY_EFFICIENCY) : 0);

  // Text encode.
  const textFlops = 2 * m.textEncoder.computeParams * m.textEncoder.tokens * prompts;
  const textWorking = c.textEncoder.kind === "cpu" ? 0 : TEXT_ACTIVATION_TENSORS * m.textEncoder.tokens * m.textEncoder.width * 2 * prompts;
  const textSeconds = c.textEncoder.kind === "cpu" ? textFlops / hw.cpuFlops : textFlops / hw.gemmFlops + swapIn(m.textEncoder.bytes, c.textEncoder);

  // Denoise.
  const flops = blockFlops(m, tokens);
  const linearRate = hw.gemmFlops * WEIGHT_COSTS[m.weights ?? "exact"].linearSpeedup;
  const batching = batch === 2 ? batchedCfgFactor(tokens, t.shape.width) : 1;
  const blockCompute = batch * batching * (flops.linear / linearRate + flops.attention / hw.attentionFlops) * FORWARD_OVER_FLOOR;
  // From disk, the reader fills one staging buffer while the other crosses the bus: the slower of the two sets the pace.
  const blockTransfer = fromDisk(c.transformer) ? Math.max(t.fileBlockBytes / hw.diskRead, t.blockBytes / hw.h2d) : t.blockBytes / hw.h2d;
  let forward = layers * blockCompute;
  if (c.transformer.kind === "streamed") {
    const streamed = layers - c.transformer.residentBlocks;
    forward = c.transformer.residentBlocks * blockCompute + streamed * (Math.max(blockCompute, blockTransfer) + STREAM_BLOCK_SECONDS);
    if (c.transformer.residentBlocks === 0 && streamed > 0) forward += blockTransfer;
  }
  const secondsPerStep = forwardsPerStep * (forward + FORWARD_FIXED_SECONDS);
  const denoiseSeconds = r.steps * secondsPerStep + swapIn(t.bytes, c.transformer);

  const phases: Record<PlanPhase, PhasePrediction> = {
    textEncode: { vram: weights("textEncode") + textWorking + TEXT_OVERHEAD, seconds: textSeconds },
    denoise: { vram: weights("denoise") + activationBytes(m, tokens, batch), seconds: denoiseSeconds },
    decode: {
      vram: weights("decode") + decodeBytes(r, c.vaeDecode),
      seconds: decodeSeconds(r, hw, c.vaeDecode) + swapIn(m.vae.bytes, c.vae),
    },
  };

  for (const phase of PLAN_PHASES) {
    const factor = corrections[phase];
    if (factor !== undefined) phases[phase] = { ...phases[phase], vram: phases[phase].vram * factor };
  }

  const hostBytes = (bytes: number, p: Placement): number => {
    if (p.kind === "resident") return 0;
    if (p.kind !== "streamed") return bytes;
    const streamed = layers - p.residentBlocks;
    return (fromDisk(p) ? Math.min(DISK_STAGING_BUFFERS, streamed) : streamed) * t.blockBytes;
  };
  const pinned = (bytes: number, p: Placement) => (p.kind === "swapped" || p.kind === "streamed" ? hostBytes(bytes, p) : 0);

  return {
    ...c,
    phases,
    peakVram: Math.max(...PLAN_PHASES.map((p) => phases[p].vram)),
    peakRam: HOST_BASE + hostBytes(m.textEncoder.bytes, c.textEncoder) + hostBytes(t.bytes, c.transformer) + hostBytes(m.vae.bytes, c.vae),
    pinnedBytes: pinned(m.textEncoder.bytes, c.textEncoder) + pinned(t.bytes, c.transformer) + pinned(m.vae.bytes, c.vae),
    residentBytes: Math.max(...PLAN_PHASES.map(weights)),
    seconds: PLAN_PHASES.reduce((s, p) => s + phases[p].seconds, 0),
    secondsPerStep,
    blockCompute,
    blockTransfer,
  };
}

/** The prediction for one given placement (what `plan` computes for each candidate), e.g. to check a measured run. */
export function predict(
  m: ModelManifest,
  hw: HardwareProfile,
  r: PlanRequest,
  c: { textEncoder: Placement; transformer: Placement; vae: Placement; cfg: CfgMode; vaeDecode: VaeDecode },
): { peakVram: number; peakRam: number; seconds: number; secondsPerStep: number; pinnedBytes: number; phases: Readonly<Record<PlanPhase, PhasePrediction>> } {
  const e = evaluate(m, hw, r, c);
  return { peakVram: e.peakVram, peakRam: e.peakRam, seconds: e.seconds, secondsPerStep: e.secondsPerStep, pinnedBytes: e.pinnedBytes, phases: e.phases };
}

// ---- the search ------------------------------------------------------------------------------

/** The candidates a memory level allows; "auto" allows them all. */
function candidates(m: ModelManifest, r: PlanRequest, level: MemoryLevel | "auto"): Candidate[] {
  const layers = m.transformer.shape.layers;
  const streamed: Placement[] = [];
  for (let k = layers - 1; k >= 0; k--) streamed.push({ kind: "streamed", residentBlocks: k, prefetch: 1, source: "ram" });
  // From disk only with exact weights: the engine streams the checkpoint's own tensors (or a scratch copy of them).
  if ((m.weights ?? "exact") === "exact") {
    for (let k = layers - 1; k >= 0; k--) streamed.push({ kind: "streamed", residentBlocks: k, prefetch: 1, source: "disk" });
  }
  const tiled: VaeDecode[] = VAE_TILES.map((t) => ({ mode: "tiled", tile: t.tile }));
  const full: VaeDecode = { mode: "full" };
  const cfgs: CfgMode[] = r.guidance > 1 ? ["batched", "sequential"] : ["off"];

  let te: Placement[], tr: Placement[], vae: Placement[], decode: VaeDecode[];
  if (level === "auto") {
    [te, tr, vae, decode] = [[RESIDENT, SWAPPED, CPU], [RESIDENT, SWAPPED, ...streamed], [RESIDENT, SWAPPED], [full, ...tiled]];
  } else {
    te = [level >= 2 ? CPU : RESIDENT];
    tr = level >= 3 ? streamed : [RESIDENT];
    vae = [RESIDENT];
    decode = level >= 1 ? [tiled[0]!] : [full];
  }
  const out: Candidate[] = [];
  for (const textEncoder of te)
    for (const transformer of tr)
      for (const v of vae) for (const vaeDecode of decode) for (const cfg of cfgs) out.push({ textEncoder, transformer, vae: v, cfg, vaeDecode });
  return out;
}

/**
 * Fastest first; among equally fast, more resident bytes, then blocks from RAM over blocks from disk (a disk shared
 * with other work and the page cache's pressure are not in the model), then lower peak.
 */
function better(a: Evaluated, b: Evaluated): boolean {
  const dt = a.seconds - b.seconds;
  if (Math.abs(dt) > 1e-9 * Math.max(a.seconds, b.seconds)) return dt < 0;
  if (a.residentBytes !== b.residentBytes) return a.residentBytes > b.residentBytes;
  if (fromDisk(a.transformer) !== fromDisk(b.transformer)) return fromDisk(b.transformer);
  return a.peakVram < b.peakVram;
}

function best(list: readonly Evaluated[]): Evaluated | undefined {
  let top: Evaluated | undefined;
  for (const e of list) if (top === undefined || better(e, top)) top = e;
  return top;
}

/**
 * The fastest candidate that fits `usable`, subject to keeping no more resident weight bytes than
 * the plan at any larger budget keeps (down to the card's whole free VRAM, `top`). Walking the budget
 * down from the top, the choice changes only when the current one stops fitting; its replacement is
 * the fastest that fits below it within the resident bytes kept so far. Without this a smaller budget
 * could hold more weights (e.g. sequential CFG making room for more resident blocks), which would
 * make the plans hard to reason about and the engine's fallback ladder non-monotonic.
 */
function descend(pool: readonly Evaluated[], top: number, usable: number): Evaluated | undefined {
  let cap = Infinity;
  let current = best(pool.filter((e) => e.peakVram <= Math.max(top, usable)));
  while (current !== undefined && current.peakVram > usable) {
    cap = Math.min(cap, current.residentBytes);
    const below = current.peakVram;
    current = best(pool.filter((e) => e.peakVram < below && e.residentBytes <= cap));
  }
  return current;
}

/**
 * The same rule along host RAM: walking the RAM budget down, the choice (descend's at the VRAM budget) changes only
 * when it stops fitting, and its replacement is chosen among the candidates holding fewer host bytes. So a smaller
 * RAM budget never holds more host bytes (e.g. never trades a CPU text encoder for blocks read from disk while the
 * encoder still fits). At the machine's own RAM this is descend alone.
 */
function descendRam(pool: readonly Evaluated[], top: number, usable: number, ram: number): Evaluated | undefined {
  let current = descend(pool, top, usable);
  while (current !== undefined && current.peakRam > ram) {
    const above = current.peakRam;
    current = descend(pool.filter((e) => e.peakRam < above), top, usable);
  }
  return current;
}

const gib = (bytes: number) => `${(bytes / GiB).toFixed(1)} GiB`;
const secs = (s: number) => (s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`);

export function describePlacement(p: Placement, layers?: number): string {
  switch (p.kind) {
    case "resident":
      return "resident";
    case "swapped":
      return "swapped per phase";
    case "cpu":
      return "on CPU";
    case "streamed":
      return `block-streamed${fromDisk(p) ? " from disk" : ""} (${p.residentBlocks}${layers === undefined ? "" : `/${layers}`} blocks resident, prefetch ${p.prefetch})`;
  }
}

export function describeDecode(d: VaeDecode): string {
  return d.mode === "full" ? "full" : `tiled (${d.tile} px tiles)`;
}

/**
 * Plans one request: the fastest candidate whose predicted peak VRAM fits the budget less its margin
 * and whose host RAM (and pinned memory) fits. Throws INFEASIBLE naming the smallest budget that works.
 */
export function plan(manifest: ModelManifest, hardware: HardwareProfile, request: PlanRequest, budget: PlanBudget = {}): Plan {
  const asked = budget.weights ?? "exact";
  if (asked !== "auto") return planOne(withWeights(manifest, asked), hardware, request, budget, []);
  // Auto: exact when it fits; else the lowest-error low-bit mode that does (WEIGHT_COSTS' order).
  let last: unknown;
  const tried: string[] = [];
  for (const mode of Object.keys(WEIGHT_COSTS) as WeightMode[]) {
    try {
      const cost = WEIGHT_COSTS[mode];
      const why = tried.length === 0 ? [] : [`weights ${mode}: ${tried.join("; ")}; ${mode} is lossy (${cost.basis} ${(cost.error * 100).toFixed(1)}% from exact)`];
      return planOne(withWeights(manifest, mode), hardware, request, budget, why);
    } catch (err) {
      if (!(err instanceof KinoError) || err.code !== "INFEASIBLE") throw err;
      last = err; // the last mode is the most compact: its error names the smallest budget of all
      tried.push(`${mode} does not fit`);
    }
  }
  throw last;
}

function planOne(manifest: ModelManifest, hardware: HardwareProfile, request: PlanRequest, budget: PlanBudget, prior: readonly string[]): Plan {
  const level = budget.memoryLevel ?? "auto";
  const margin = budget.margin ?? DEFAULT_MARGIN;
  const reasons: string[] = [...prior];
  const askedVram = budget.vram ?? hardware.vramFree;
  const vram = Math.min(askedVram, hardware.vramFree);
  if (askedVram > hardware.vramFree) reasons.push(`VRAM budget ${gib(askedVram)} capped at the ${hardware.name}'s free ${gib(hardware.vramFree)}`);
  const ram = budget.ram ?? hardware.hostRam;
  const usable = vram * (1 - margin);
  const tokens = videoTokens(manifest, request);
  reasons.push(
    `budget: VRAM ${gib(vram)} − ${Math.round(margin * 100)}% margin = ${gib(usable)} usable; host RAM ${gib(ram)} (pinned at most ${gib(hardware.pinnedLimit)})`,
  );
  reasons.push(
    `request: ${request.width}x${request.height}x${request.frames}, ${request.steps} steps → ${tokens} video tokens; ` +
      (request.guidance > 1 ? `CFG ${request.guidance} doubles the batch` : `guidance ${request.guidance}: no CFG pass`),
  );
  if (level !== "auto") reasons.push(`memory level ${level} (preset): ${LEVEL_MEANING[level]}`);

  const corrections = budget.corrections ?? {};
  const corrected = PLAN_PHASES.filter((p) => corrections[p] !== undefined && corrections[p] !== 1);
  if (corrected.length > 0) {
    reasons.push(`peaks corrected from this machine's measurements: ${corrected.map((p) => `${p} ×${corrections[p]!.toFixed(3)}`).join(", ")}`);
  }
  const all = candidates(manifest, request, level).map((c) => evaluate(manifest, hardware, request, c, corrections));
  const hostOk = all.filter((e) => e.peakRam <= ram && e.pinnedBytes <= hardware.pinnedLimit);
  // The descent can in principle corner itself (nothing within the resident bytes kept fits); then the fastest that fits.
  const pinnable = all.filter((e) => e.pinnedBytes <= hardware.pinnedLimit && e.peakRam <= Math.max(ram, hardware.hostRam));
  const chosen = descendRam(pinnable, hardware.vramFree * (1 - margin), usable, ram) ?? best(hostOk.filter((e) => e.peakVram <= usable));
  if (chosen === undefined) throw infeasible(manifest, hardware, request, level, all, hostOk, vram, ram, margin);
  const fastest = best(hostOk.filter((e) => e.peakVram <= usable))!;
  if (fastest !== chosen) {
    reasons.push(
      `kept to ${gib(chosen.residentBytes)} of weights on the device, no more than any larger budget keeps, so that a smaller budget never holds more ` +
        `(the fastest plan that fits would keep ${gib(fastest.residentBytes)} and save ${secs(chosen.seconds - fastest.seconds)})`,
    );
  }

  explain(reasons, manifest, hardware, ram, chosen, hostOk, usable, level);
  return {
    model: manifest.id,
    hardware: hardware.name,
    request,
    memoryLevel: level,
    placement: { textEncoder: chosen.textEncoder, transformer: chosen.transformer, vae: chosen.vae },
    cfg: chosen.cfg,
    vaeDecode: chosen.vaeDecode,
    tokens,
    residentBytes: chosen.residentBytes,
    pinnedBytes: chosen.pinnedBytes,
    budget: { vram, usableVram: usable, ram, margin },
    predicted: {
      peakVram: chosen.peakVram,
      peakRam: chosen.peakRam,
      seconds: chosen.seconds,
      secondsPerStep: chosen.secondsPerStep,
      phases: chosen.phases,
    },
    weights: manifest.weights ?? "exact",
    weightsError: WEIGHT_COSTS[manifest.weights ?? "exact"].error,
    corrections,
    reasons,
  };
}

const LEVEL_MEANING: Readonly<Record<MemoryLevel, string>> = {
  0: "everything resident",
  1: "VAE decode tiled",
  2: "VAE decode tiled, text encoder on the CPU",
  3: "VAE decode tiled, text encoder on the CPU, transformer block-streamed",
};

/** Logs each decision against its alternatives: what they would have cost, or why they do not fit. */
function explain(
  reasons: string[],
  m: ModelManifest,
  hw: HardwareProfile,
  ramBudget: number,
  chosen: Evaluated,
  pool: readonly Evaluated[],
  usable: number,
  level: MemoryLevel | "auto",
): void {
  const layers = m.transformer.shape.layers;
  const axes: ReadonlyArray<{ name: string; key: (e: Candidate) => string; show: (e: Candidate) => string; bytes?: number }> = [
    { name: "text encoder", key: (e) => e.textEncoder.kind, show: (e) => describePlacement(e.textEncoder), bytes: m.textEncoder.bytes },
    { name: "transformer", key: (e) => (fromDisk(e.transformer) ? "streamed from disk" : e.transformer.kind), show: (e) => describePlacement(e.transformer, layers), bytes: m.transformer.bytes },
    { name: "VAE", key: (e) => e.vae.kind, show: (e) => describePlacement(e.vae), bytes: m.vae.bytes },
    { name: "CFG", key: (e) => e.cfg, show: (e) => e.cfg },
    { name: "VAE decode", key: (e) => (e.vaeDecode.mode === "full" ? "full" : `tiled ${e.vaeDecode.tile}`), show: (e) => describeDecode(e.vaeDecode) },
  ];
  for (const axis of axes) {
    const mine = axis.key(chosen);
    const others = new Map<string, Evaluated[]>();
    for (const e of pool) {
      const k = axis.key(e);
      if (k !== mine) others.set(k, [...(others.get(k) ?? []), e]);
    }
    const why: string[] = [];
    for (const [k, list] of others) {
      const fits = best(list.filter((e) => e.peakVram <= usable));
      if (fits !== undefined) why.push(`${k} would take ${secs(fits.seconds - chosen.seconds)} more`);
      else why.push(`${k} needs ≥ ${gib(Math.min(...list.map((e) => e.peakVram)))} peak VRAM > ${gib(usable)} usable`);
    }
    const size = axis.bytes === undefined ? "" : ` (${gib(axis.bytes)})`;
    const because = why.length > 0 ? `: ${why.join("; ")}` : level === "auto" ? "" : ": fixed by the memory level";
    reasons.push(`${axis.name}${size}: ${axis.show(chosen)}${because}`);
  }
  if (chosen.transformer.kind === "streamed") {
    const hidden = chosen.blockCompute >= chosen.blockTransfer;
    const disk = fromDisk(chosen.transformer);
    reasons.push(
      `streaming${disk ? " from disk" : ""}: a block computes in ${secs(chosen.blockCompute)} and ${disk ? "is read and copied" : "copies"} in ${secs(chosen.blockTransfer)} → ` +
        (hidden ? "the copy hides behind the compute" : `the copy dominates (${(chosen.blockTransfer / chosen.blockCompute).toFixed(1)}× the compute)`),
    );
    if (disk) {
      const t = m.transformer;
      reasons.push(
        `from disk: the streamed blocks (${gib((layers - chosen.transformer.residentBlocks) * t.blockBytes)}) would not fit in host RAM beside the rest ` +
          `(${gib(ramBudget)}, pinned at most ${gib(hw.pinnedLimit)}); ` +
          `host RAM holds ${DISK_STAGING_BUFFERS} staging buffers (${gib(DISK_STAGING_BUFFERS * t.blockBytes)}) and a block reads ${gib(t.fileBlockBytes)} ` +
          `at ${(hw.diskRead / 1e9).toFixed(1)} GB/s`,
      );
    }
  }
}

function infeasible(
  m: ModelManifest,
  hw: HardwareProfile,
  r: PlanRequest,
  level: MemoryLevel | "auto",
  all: readonly Evaluated[],
  hostOk: readonly Evaluated[],
  vram: number,
  ram: number,
  margin: number,
): KinoError {
  const what = `${m.id} at ${r.width}x${r.height}x${r.frames}${level === "auto" ? "" : ` at memory level ${level}`}`;
  const pinnable = all.filter((e) => e.pinnedBytes <= hw.pinnedLimit);
  // The smallest host RAM among the plans the VRAM budget allows, rounded up so that the budget named works.
  const ramToFit = Math.min(...pinnable.filter((e) => e.peakVram <= vram * (1 - margin)).map((e) => e.peakRam));
  const ramNamed = (bytes: number) => `--ram ${(Math.ceil((bytes / GiB) * 10) / 10).toFixed(1)}GB`;
  if (hostOk.length === 0) {
    const needRam = Number.isFinite(ramToFit) ? ramToFit : Math.min(...pinnable.map((e) => e.peakRam));
    return new KinoError(
      "INFEASIBLE",
      Number.isFinite(needRam)
        ? `${what} does not fit in ${gib(ram)} of host RAM; the smallest budget that works is ${ramNamed(needRam)}`
        : `${what} needs more pinned host memory than the ${hw.name} allows (${gib(hw.pinnedLimit)})`,
      { field: "ram" },
    );
  }
  const smallest = Math.min(...hostOk.map((e) => e.peakVram));
  const need = Math.ceil((smallest / (1 - margin) / GiB) * 10) / 10;
  const onCard = need * GiB > hw.vramFree ? ` (more than the ${hw.name}'s ${gib(hw.vramFree)} free)` : "";
  if (onCard !== "" && Number.isFinite(ramToFit)) {
    // More host RAM (or the disk tier's staging ring) makes room on the card: name the RAM first.
    return new KinoError(
      "INFEASIBLE",
      `${what} does not fit in ${gib(ram)} of host RAM with ${gib(vram)} of VRAM; the smallest budget that works is ${ramNamed(ramToFit)} ` +
        `(at this RAM it needs --vram ${need.toFixed(1)}GB${onCard})`,
      { field: "ram" },
    );
  }
  const auto = level !== "auto" ? "; or let the planner choose with --memory-level auto" : "";
  const moreRam = Number.isFinite(ramToFit) ? `, or ${ramNamed(ramToFit)} at this VRAM budget` : "";
  return new KinoError(
    "INFEASIBLE",
    `${what} does not fit in ${gib(vram)} of VRAM; the smallest budget that works is --vram ${need.toFixed(1)}GB${onCard}` +
      `${moreRam}, or use a smaller --size or --frames${auto}`,
    { field: "vram" },
  );
}

/** The smallest VRAM budget (bytes) that `plan` accepts for this request and level, host RAM allowing. */
export function smallestVramBudget(m: ModelManifest, hw: HardwareProfile, r: PlanRequest, budget: PlanBudget = {}): number {
  const level = budget.memoryLevel ?? "auto";
  const margin = budget.margin ?? DEFAULT_MARGIN;
  const ram = budget.ram ?? hw.hostRam;
  const ok = candidates(m, r, level)
    .map((c) => evaluate(m, hw, r, c, budget.corrections))
    .filter((e) => e.peakRam <= ram && e.pinnedBytes <= hw.pinnedLimit);
  return Math.min(...ok.map((e) => e.peakVram)) / (1 - margin);
}
