/**
 * Wan 2.1 text-to-video: the architecture configs of the diffusers-format checkpoints
 * (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers), component by component, as diffusers/transformers
 * read them. `--random-weights` builds these architectures at full size without downloading
 * anything, for benchmarks: timings don't depend on the weight values.
 */
import type { WanArchitecture } from "../protocol/engine.ts";

/**
 * Wan's standard negative prompt (from the Wan 2.1 reference code), in Chinese as the model was
 * trained with it: vivid tones, overexposed, static, blurry details, subtitles, … walking backwards.
 */
export const WAN_NEGATIVE_PROMPT =
  "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/** diffusers WanTransformer3DModel, shared by both sizes; the sizes differ in width, depth and FFN. */
function wanTransformer(layers: number, heads: number, ffnDim: number): Record<string, unknown> {
  return {
    _class_name: "WanTransformer3DModel",
    patch_size: [1, 2, 2],
    num_attention_heads: heads,
    attention_head_dim: 128,
    in_channels: 16,
    out_channels: 16,
    text_dim: 4096,
    freq_dim: 256,
    ffn_dim: ffnDim,
    num_layers: layers,
    cross_attn_norm: true,
    qk_norm: "rms_norm_across_heads",
    eps: 1e-6,
    image_dim: null,
    added_kv_proj_dim: null,
    rope_max_seq_len: 1024,
  };
}

/** diffusers AutoencoderKLWan: 8× spatial and 4× temporal compression into 16 latent channels. */
const WAN21_VAE: Record<string, unknown> = {
  _class_name: "AutoencoderKLWan",
  base_dim: 96,
  z_dim: 16,
  dim_mult: [1, 2, 4, 4],
  num_res_blocks: 2,
  attn_scales: [],
  temperal_downsample: [false, true, true],
  dropout: 0.0,
  latents_mean: [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922,
    -0.9497, 0.2503, -0.2921,
  ],
  latents_std: [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253,
    2.8251, 1.916,
  ],
};

/** transformers UMT5EncoderModel: the encoder of google/umt5-xxl. */
const UMT5_XXL_ENCODER: Record<string, unknown> = {
  architectures: ["UMT5EncoderModel"],
  model_type: "umt5",
  vocab_size: 256384,
  d_model: 4096,
  d_kv: 64,
  d_ff: 10240,
  num_layers: 24,
  num_decoder_layers: 24,
  num_heads: 64,
  relative_attention_num_buckets: 32,
  relative_attention_max_distance: 128,
  dropout_rate: 0.1,
  layer_norm_epsilon: 1e-6,
  initializer_factor: 1.0,
  feed_forward_proj: "gated-gelu",
  dense_act_fn: "gelu_new",
  is_gated_act: true,
  is_encoder_decoder: true,
  scalable_attention: true,
  tie_word_embeddings: false,
  use_cache: true,
  classifier_dropout: 0.0,
  pad_token_id: 0,
  eos_token_id: 1,
  decoder_start_token_id: 0,
  tokenizer_class: "T5Tokenizer",
};

/** The scheduler the Diffusers repos ship: UniPC over flow-matching sigmas, shift 3.0 (480p). */
const WAN21_SCHEDULER = {
  className: "UniPCMultistepScheduler",
  config: {
    num_train_timesteps: 1000,
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    trained_betas: null,
    solver_order: 2,
    prediction_type: "flow_prediction",
    thresholding: false,
    dynamic_thresholding_ratio: 0.995,
    sample_max_value: 1.0,
    predict_x0: true,
    solver_type: "bh2",
    lower_order_final: true,
    disable_corrector: [],
    solver_p: null,
    use_karras_sigmas: false,
    use_exponential_sigmas: false,
    use_beta_sigmas: false,
    use_flow_sigmas: true,
    flow_shift: 3.0,
    timestep_spacing: "linspace",
    steps_offset: 0,
    final_sigmas_type: "zero",
    rescale_betas_zero_snr: false,
  },
};

function wan21Architecture(transformer: Record<string, unknown>): WanArchitecture {
  return {
    family: "wan2.1-t2v",
    transformer,
    vae: WAN21_VAE,
    textEncoder: UMT5_XXL_ENCODER,
    scheduler: WAN21_SCHEDULER,
    tokenizerVocabSize: UMT5_XXL_ENCODER.vocab_size as number,
  };
}

/** Wan2.1-T2V-1.3B: 30 blocks of width 1536 (12 heads × 128). */
export const WAN21_T2V_1_3B: WanArchitecture = wan21Architecture(wanTransformer(30, 12, 8960));

/** Wan2.1-T2V-14B: 40 blocks of width 5120 (40 heads × 128). */
export const WAN21_T2V_14B: WanArchitecture = wan21Architecture(wanTransformer(40, 40, 13824));
