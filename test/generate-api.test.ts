/** The generate API's pure decisions: placement (device, dtype) and the job built from a request and a model's defaults. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { buildJob, choosePlacement } from "../src/api/generate.ts";
import { GenerateOptions } from "../src/api/generate-options.ts";
import { TINY_DEFAULTS, WAN21_480P_DEFAULTS, WAN21_SHAPE } from "../src/catalog/models.ts";
import type { ResolvedModel } from "../src/catalog/resolve.ts";
import type { KinoError } from "../src/errors.ts";

test("placement: as asked, else cuda/bf16 with a GPU and cpu/fp32 without; cuda without a GPU is refused", () => {
  const gpu = [{ index: 0, name: "H100", totalBytes: 1, freeBytes: 1, capability: "9.0" }];
  const table = [
    [{}, gpu, "cuda", "bfloat16", /device cuda \(bfloat16\): the engine sees H100/],
    [{}, [], "cpu", "float32", /device cpu \(float32\): the engine sees no CUDA GPU/],
    [{ device: "cpu" as const }, gpu, "cpu", "float32", null],
    [{ dtype: "fp16" as const }, gpu, "cuda", "float16", /device cuda/],
    [{ device: "cpu" as const, dtype: "bf16" as const }, [], "cpu", "bfloat16", null],
  ] as const;
  for (const [asked, gpus, device, dtype, reason] of table) {
    const p = choosePlacement(asked, gpus);
    assert.deepEqual([p.device, p.dtype], [device, dtype], JSON.stringify(asked));
    if (reason === null) assert.equal(p.reason, null);
    else assert.match(p.reason ?? "", reason);
  }
  assert.throws(() => choosePlacement({ device: "cuda" }, []), (e: KinoError) => e.code === "DEVICE_UNAVAILABLE" && e.field === "device");
});

test("the job takes the request's values and the model's defaults for the rest", () => {
  const model = (tiny: boolean): ResolvedModel => ({
    name: "m",
    id: null,
    path: "/m",
    randomWeights: false,
    tiny,
    needsMakeTiny: false,
    defaults: tiny ? TINY_DEFAULTS : WAN21_480P_DEFAULTS,
    shape: WAN21_SHAPE,
  });
  const outputs = { video: "/o/v.mp4", framesDir: null };
  const bare = buildJob(GenerateOptions.parse({ prompt: "p", out: "v.mp4" }), model(false), outputs, 3);
  assert.deepEqual(bare, {
    prompt: "p",
    negativePrompt: WAN21_480P_DEFAULTS.negativePrompt,
    width: 832,
    height: 480,
    frames: 81,
    steps: 50,
    guidance: 5,
    shift: 3,
    seed: 3,
    fps: null,
    output: outputs,
  });
  const asked = buildJob(
    GenerateOptions.parse({ prompt: "p", out: "v.mp4", size: "320x192", frames: 9, steps: 2, guidance: 0, shift: 5, fps: 8, negativePrompt: "" }),
    model(true),
    outputs,
    0,
  );
  assert.deepEqual(
    [asked.width, asked.height, asked.frames, asked.steps, asked.guidance, asked.shift, asked.fps, asked.negativePrompt],
    [320, 192, 9, 2, 0, 5, 8, ""],
  );
  assert.equal(buildJob(GenerateOptions.parse({ prompt: "p", out: "v.mp4" }), model(true), outputs, 0).shift, null, "tiny keeps its scheduler's shift");
});
