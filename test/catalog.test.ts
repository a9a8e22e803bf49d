/** The model catalog: ids, defaults, the full architecture configs, and the rules that pick and resolve models. */
import assert from "node:assert/strict";
import { truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { inspectCheckpoint } from "../src/catalog/checkpoint.ts";
import { CATALOG, findCatalogModel, TINY_DEFAULTS, WAN21_480P_DEFAULTS } from "../src/catalog/models.ts";
import { modelSource, parseModelRef, pickAutoModel, resolveModel } from "../src/catalog/resolve.ts";
import { readSafetensorsHeader } from "../src/catalog/safetensors.ts";
import { WAN21_T2V_14B, WAN21_T2V_1_3B, WAN_NEGATIVE_PROMPT } from "../src/catalog/wan21.ts";
import { KinoError } from "../src/errors.ts";
import { WanArchitecture } from "../src/protocol/engine.ts";
import { safetensorsBytes, writeFakeCheckpoint } from "./fixtures/checkpoint.ts";
import { rejectsWith } from "./engine-conformance.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

test("the catalog holds tiny, the 1.3B and the 14B, the real ones from the Wan-AI Diffusers repos", () => {
  assert.deepEqual(
    CATALOG.map((m) => [m.id, m.hubRepo]),
    [
      ["tiny", null],
      ["wan2.1-t2v-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"],
      ["wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers"],
    ],
  );
  assert.ok(Object.isFrozen(CATALOG) && Object.isFrozen(CATALOG[1]!.defaults));
});

test("Wan 480p defaults: 832x480, 81 frames, 50 steps, guidance 5, shift 3, 16 fps, the standard negative prompt", () => {
  assert.deepEqual(
    { ...WAN21_480P_DEFAULTS, negativePrompt: undefined },
    { width: 832, height: 480, frames: 81, steps: 50, guidance: 5, shift: 3, fps: 16, negativePrompt: undefined },
  );
  assert.ok(WAN_NEGATIVE_PROMPT.startsWith("色调艳丽，过曝，静态") && WAN_NEGATIVE_PROMPT.endsWith("倒着走"));
  // Every default must itself pass the shape rules it is checked against.
  for (const d of [WAN21_480P_DEFAULTS, TINY_DEFAULTS]) {
    assert.equal(d.width % 16, 0);
    assert.equal(d.height % 16, 0);
    assert.equal((d.frames - 1) % 4, 0);
  }
});

test("the architectures are the published configs and fit the protocol's schema", () => {
  for (const a of [WAN21_T2V_1_3B, WAN21_T2V_14B]) WanArchitecture.parse(a);
  const t13 = WAN21_T2V_1_3B.transformer;
  assert.deepEqual(
    [t13.num_layers, t13.num_attention_heads, t13.attention_head_dim, t13.ffn_dim, t13.text_dim, t13.freq_dim, t13.in_channels, t13.out_channels],
    [30, 12, 128, 8960, 4096, 256, 16, 16],
  );
  assert.deepEqual([t13.patch_size, t13.qk_norm, t13.cross_attn_norm, t13.eps, t13.rope_max_seq_len], [[1, 2, 2], "rms_norm_across_heads", true, 1e-6, 1024]);
  const t14 = WAN21_T2V_14B.transformer;
  assert.deepEqual([t14.num_layers, t14.num_attention_heads, t14.ffn_dim], [40, 40, 13824]);
  const vae = WAN21_T2V_1_3B.vae;
  assert.deepEqual([vae.base_dim, vae.z_dim, vae.dim_mult, vae.num_res_blocks, vae.attn_scales, vae.temperal_downsample], [96, 16, [1, 2, 4, 4], 2, [], [false, true, true]]);
  assert.equal((vae.latents_mean as number[]).length, 16);
  assert.equal((vae.latents_std as number[]).length, 16);
  assert.equal((vae.latents_mean as number[])[0], -0.7571);
  assert.equal((vae.latents_std as number[])[15], 1.916);
  const te = WAN21_T2V_1_3B.textEncoder;
  assert.deepEqual(
    [te.model_type, te.d_model, te.d_ff, te.d_kv, te.num_heads, te.num_layers, te.vocab_size, te.relative_attention_num_buckets, te.relative_attention_max_distance, te.feed_forward_proj, te.layer_norm_epsilon],
    ["umt5", 4096, 10240, 64, 64, 24, 256384, 32, 128, "gated-gelu", 1e-6],
  );
  const s = WAN21_T2V_1_3B.scheduler;
  assert.equal(s.className, "UniPCMultistepScheduler");
  assert.deepEqual(
    [s.config.prediction_type, s.config.use_flow_sigmas, s.config.flow_shift, s.config.num_train_timesteps, s.config.solver_order],
    ["flow_prediction", true, 3, 1000, 2],
  );
  assert.equal(WAN21_T2V_1_3B.tokenizerVocabSize, 256384);
});

test("auto: the 1.3B only with a GPU and its weights; otherwise tiny, with the reason", () => {
  const table = [
    [{ hasGpu: true, wan13bPresent: true }, "wan2.1-t2v-1.3b", /weights are here and a CUDA GPU/],
    [{ hasGpu: true, wan13bPresent: false }, "tiny", /not downloaded/],
    [{ hasGpu: false, wan13bPresent: true }, "tiny", /no CUDA GPU/],
    [{ hasGpu: false, wan13bPresent: false }, "tiny", /no CUDA GPU/],
  ] as const;
  for (const [facts, id, reason] of table) {
    const pick = pickAutoModel(facts);
    assert.equal(pick.id, id, JSON.stringify(facts));
    assert.match(pick.reason, reason);
  }
});

test("model refs: ids, auto, paths; unknown names list the known ids", async () => {
  const dir = tempDir();
  try {
    assert.deepEqual(await parseModelRef("auto", dir), { kind: "auto" });
    assert.equal((await parseModelRef("wan2.1-t2v-14b", dir)).kind, "catalog");
    assert.deepEqual(await parseModelRef("./x", dir), { kind: "folder", path: join(dir, "x") });
    writeFakeCheckpoint(join(dir, "plainname"));
    assert.deepEqual(await parseModelRef("plainname", dir), { kind: "folder", path: join(dir, "plainname") }, "an existing folder without a slash");
    const err = await rejectsWith(parseModelRef("wan3", dir), "UNKNOWN_MODEL");
    assert.match(err.message, /tiny, wan2\.1-t2v-1\.3b, wan2\.1-t2v-14b/);
  } finally {
    removeDir(dir);
  }
});

test("resolving: tiny is made on first use; random weights need no download; the source follows", async () => {
  const home = tempDir();
  try {
    const models = join(home, "models");
    const tiny = await resolveModel({ kind: "catalog", model: findCatalogModel("tiny")! }, { modelsDir: models, randomWeights: false });
    assert.deepEqual([tiny.tiny, tiny.needsMakeTiny, tiny.path], [true, true, join(models, "tiny")]);
    const rw = await resolveModel({ kind: "catalog", model: findCatalogModel("wan2.1-t2v-1.3b")! }, { modelsDir: models, randomWeights: true });
    assert.deepEqual(modelSource(rw, 9), { kind: "random", architecture: WAN21_T2V_1_3B, seed: 9 });
    writeFakeCheckpoint(join(models, "wan2.1-t2v-14b"), { tiny: false });
    const real = await resolveModel({ kind: "catalog", model: findCatalogModel("wan2.1-t2v-14b")! }, { modelsDir: models, randomWeights: false });
    assert.deepEqual(modelSource(real, 0), { kind: "checkpoint", path: join(models, "wan2.1-t2v-14b") });
    assert.equal(real.tiny, false);
    assert.equal(real.defaults.negativePrompt, WAN_NEGATIVE_PROMPT);
  } finally {
    removeDir(home);
  }
});

test("checkpoint inspection: components, weight bytes, the tiny marker, sharded indexes", async () => {
  const dir = tempDir();
  try {
    const info = await inspectCheckpoint(writeFakeCheckpoint(join(dir, "c")));
    assert.deepEqual([...info.components].sort(), ["scheduler", "text_encoder", "tokenizer", "transformer", "vae"]);
    assert.equal(info.weightBytes, 3 * 16);
    assert.equal(info.tiny, true);
    // A sharded component whose index names a shard that is not there.
    const sharded = writeFakeCheckpoint(join(dir, "s"), { tiny: false });
    writeFileSync(join(sharded, "transformer", "diffusion_pytorch_model.safetensors.index.json"), JSON.stringify({ weight_map: { a: "shard-00002.safetensors" } }));
    const err = await rejectsWith(inspectCheckpoint(sharded), "BAD_CHECKPOINT");
    assert.match(err.message, /shard-00002\.safetensors is missing/);
  } finally {
    removeDir(dir);
  }
});

test("safetensors headers: read without the data; truncation and garbage are BAD_CHECKPOINT naming the file", async () => {
  const dir = tempDir();
  try {
    const good = join(dir, "good.safetensors");
    writeFileSync(good, safetensorsBytes(8));
    const header = await readSafetensorsHeader(good);
    assert.deepEqual(header.tensors.get("w"), { dtype: "F32", shape: [8], bytes: 32 });
    assert.equal(header.dataBytes, 32);
    const cut = join(dir, "cut.safetensors");
    writeFileSync(cut, safetensorsBytes(8));
    truncateSync(cut, safetensorsBytes(8).length - 4);
    const e1 = await rejectsWith(readSafetensorsHeader(cut), "BAD_CHECKPOINT");
    assert.match(e1.message, /cut\.safetensors .*tensor w ends at byte 32 of the data but the file holds 28 \(truncated\)/);
    const junk = join(dir, "junk.safetensors");
    writeFileSync(junk, Buffer.from("not a safetensors file at all"));
    const e2 = await rejectsWith(readSafetensorsHeader(junk), "BAD_CHECKPOINT");
    assert.match(e2.message, /junk\.safetensors/);
    assert.ok(e2 instanceof KinoError && e2.exitCode === 2);
  } finally {
    removeDir(dir);
  }
});
