/**
 * The model manifest: what each component of a Wan 2.1 pipeline weighs, computed from the
 * architecture configs in the catalog (src/catalog/wan21.ts) without reading any weights. The planner
 * decides placements from these numbers; it never sees a tensor.
 *
 * Parameter counts follow diffusers' WanTransformer3DModel and transformers' UMT5EncoderModel module
 * by module (test/planner.test.ts checks them against the published totals). The VAE is counted
 * from its checkpoint, not derived: its 3D convolutions are small next to the rest (≈ 2% of 1.3B).
 */
import type { WanArchitecture } from "../protocol/engine.ts";

export type WeightDtype = "bf16" | "fp16" | "fp32";

export const DTYPE_BYTES: Readonly<Record<WeightDtype, number>> = { bf16: 2, fp16: 2, fp32: 4 };

/** The shapes the cost model needs from the transformer. */
export interface TransformerShape {
  /** Model width d (heads × head dim). */
  readonly width: number;
  /** FFN width f. */
  readonly ffnWidth: number;
  readonly layers: number;
  readonly heads: number;
  /** Latent channels in; with the patch, how many pixels of latent make one token. */
  readonly inChannels: number;
  /** (t, h, w) patch of the latent per token. */
  readonly patch: readonly [number, number, number];
  /** Width of the text encoder's output (cross-attention keys and values come from it). */
  readonly textDim: number;
}

export interface ComponentManifest {
  readonly params: number;
  readonly bytes: number;
}

export interface TransformerManifest extends ComponentManifest {
  readonly shape: TransformerShape;
  /** Parameters and bytes of one repeated block (all blocks are alike). */
  readonly blockParams: number;
  readonly blockBytes: number;
  /** Everything outside the blocks: patch embedding, time/text embeddings, output head. */
  readonly restParams: number;
  readonly restBytes: number;
  /**
   * Bytes one block takes in the weight files, what streaming it from disk reads: the dtype's unless the files say
   * otherwise (`withWeightFiles`; Wan's Diffusers checkpoints store float32, twice the bf16 block).
   */
  readonly fileBlockBytes: number;
}

export interface TextEncoderManifest extends ComponentManifest {
  /** Parameters the forward multiplies through per token (the embedding table is a lookup). */
  readonly computeParams: number;
  /**
   * Tokens per prompt the prediction assumes: Wan pads prompts to 512, and the plan prices that many
   * (an upper bound: kino's engine runs the encoder on a prompt's own tokens only, so its text
   * encode and its activations are usually far below the prediction).
   */
  readonly tokens: number;
  /** Model width d_model. */
  readonly width: number;
}

/** How the transformer's block linears are stored (engine RuntimeOptions.weights; kino_engine/quant). */
export type WeightMode = "exact" | "fp8" | "fp8-weight" | "int8" | "int8-dynamic";
export const WEIGHT_MODES: readonly WeightMode[] = ["exact", "fp8", "fp8-weight", "int8", "int8-dynamic"];

export interface ModelManifest {
  readonly id: string;
  readonly dtype: WeightDtype;
  /** The transformer's block linears: exact (the dtype) or a low-bit mode. @default "exact" */
  readonly weights?: WeightMode;
  readonly textEncoder: TextEncoderManifest;
  readonly transformer: TransformerManifest;
  readonly vae: ComponentManifest;
}

/** Parameters of diffusers' AutoencoderKLWan (Wan 2.1 VAE): its fp32 checkpoint is 508 MB. */
export const WAN21_VAE_PARAMS = 126_900_000;

/** Wan pads every prompt to this many tokens. */
export const WAN_TEXT_TOKENS = 512;

const num = (config: Record<string, unknown>, key: string): number => {
  const v = config[key];
  if (typeof v !== "number") throw new Error(`architecture config lacks the number ${key}`);
  return v;
};

/** Parameters of one Wan transformer block (diffusers WanTransformerBlock). */
export function wanBlockParams(d: number, f: number): number {
  const attention = 4 * (d * d + d) + 2 * d; // q, k, v, o with biases; RMS norms of q and k across heads
  const selfAttn = attention;
  const crossAttn = attention;
  const crossNorm = 2 * d; // LayerNorm with affine before cross-attention (cross_attn_norm)
  const ffn = d * f + f + f * d + d;
  const modulation = 6 * d; // scale_shift_table (1, 6, d)
  return selfAttn + crossAttn + crossNorm + ffn + modulation;
}

export function transformerManifest(config: Record<string, unknown>, dtype: WeightDtype): TransformerManifest {
  const heads = num(config, "num_attention_heads");
  const d = heads * num(config, "attention_head_dim");
  const f = num(config, "ffn_dim");
  const layers = num(config, "num_layers");
  const inChannels = num(config, "in_channels");
  const outChannels = num(config, "out_channels");
  const textDim = num(config, "text_dim");
  const freqDim = num(config, "freq_dim");
  const patch = config.patch_size as [number, number, number];
  const patchVolume = patch[0] * patch[1] * patch[2];
  const patchEmbedding = inChannels * patchVolume * d + d;
  const timeEmbedding = freqDim * d + d + d * d + d;
  const timeProjection = d * 6 * d + 6 * d;
  const textEmbedding = textDim * d + d + d * d + d;
  const head = d * outChannels * patchVolume + outChannels * patchVolume + 2 * d; // proj_out + scale_shift_table
  const restParams = patchEmbedding + timeEmbedding + timeProjection + textEmbedding + head;
  const blockParams = wanBlockParams(d, f);
  const params = layers * blockParams + restParams;
  const b = DTYPE_BYTES[dtype];
  return {
    params,
    bytes: params * b,
    shape: { width: d, ffnWidth: f, layers, heads, inChannels, patch, textDim },
    blockParams,
    blockBytes: blockParams * b,
    restParams,
    restBytes: restParams * b,
    fileBlockBytes: blockParams * b,
  };
}

/** transformers UMT5EncoderModel: embedding, then per layer attention (with its own relative bias) and a gated FFN. */
export function umt5EncoderManifest(config: Record<string, unknown>, dtype: WeightDtype): TextEncoderManifest {
  const d = num(config, "d_model");
  const inner = num(config, "num_heads") * num(config, "d_kv");
  const ff = num(config, "d_ff");
  const layers = num(config, "num_layers");
  const embedding = num(config, "vocab_size") * d;
  const gated = config.is_gated_act === true ? 3 : 2;
  const layer = 4 * d * inner + num(config, "relative_attention_num_buckets") * num(config, "num_heads") + 2 * d + gated * d * ff;
  const computeParams = layers * layer + d;
  const params = embedding + computeParams;
  return { params, bytes: params * DTYPE_BYTES[dtype], computeParams, tokens: WAN_TEXT_TOKENS, width: d };
}

/** The manifest of a catalog architecture, every component in `dtype`. Pure. */
export function modelManifest(id: string, architecture: Pick<WanArchitecture, "transformer" | "textEncoder">, dtype: WeightDtype = "bf16"): ModelManifest {
  return {
    id,
    dtype,
    textEncoder: umt5EncoderManifest(architecture.textEncoder, dtype),
    transformer: transformerManifest(architecture.transformer, dtype),
    vae: { params: WAN21_VAE_PARAMS, bytes: WAN21_VAE_PARAMS * DTYPE_BYTES[dtype] },
  };
}

/**
 * The manifest with the transformer's block linears stored in `mode`: one byte per weight plus an
 * fp32 scale per output channel (q, k, v, o of both attentions and the FFN's two projections);
 * biases, norms, modulation and everything outside the blocks stay in the dtype (quant/policy.py).
 */
export function withWeights(m: ModelManifest, mode: WeightMode): ModelManifest {
  if (mode === "exact") return { ...m, weights: "exact" };
  const t = m.transformer;
  const { width: d, ffnWidth: f } = t.shape;
  const linearWeights = 8 * d * d + 2 * d * f;
  const scales = (8 * d + f + d) * 4;
  const b = DTYPE_BYTES[m.dtype];
  const blockBytes = (t.blockParams - linearWeights) * b + linearWeights + scales;
  return {
    ...m,
    weights: mode,
    transformer: { ...t, blockBytes, bytes: t.shape.layers * blockBytes + t.restBytes },
  };
}

/** The manifest with the bytes one transformer block takes in the weight files as they are (their headers say). */
export function withWeightFiles(m: ModelManifest, fileBlockBytes: number): ModelManifest {
  return { ...m, transformer: { ...m.transformer, fileBlockBytes } };
}
