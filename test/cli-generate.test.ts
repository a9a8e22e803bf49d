/**
 * `kino generate` in-process over the FakeEngine: the decisions it makes (auto model, device, dtype,
 * defaults, seed), what it prints (notices, progress, summary, --json), making tiny on first use,
 * and Ctrl-C → CANCELLED → exit 130 with nothing written.
 */
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { resolveConfig } from "../src/config/config.ts";
import { TINY_DEFAULTS } from "../src/catalog/models.ts";
import { WAN_NEGATIVE_PROMPT } from "../src/catalog/wan21.ts";
import type { EngineClient } from "../src/engine/client.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { probeVideo } from "../src/media/ffprobe.ts";
import type { DeviceInfo, ModelSpec } from "../src/protocol/engine.ts";
import { pngBytesSize } from "./engine-conformance.ts";
import { writeFakeCheckpoint } from "./fixtures/checkpoint.ts";
import { runKino } from "./fixtures/cli.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const GPU: DeviceInfo = { index: 0, name: "Fake H100", totalBytes: 80 * 2 ** 30, freeBytes: 79 * 2 ** 30, capability: "9.0" };
const SMALL = ["--size", "64x48", "--frames", "5", "--steps", "3"];

/** A FakeEngine that records what it was asked to load. */
function recordingEngine(devices: DeviceInfo[] = []): { make: () => EngineClient; loaded: ModelSpec[] } {
  const loaded: ModelSpec[] = [];
  return {
    loaded,
    make: () => {
      const engine = new FakeEngine({ devices });
      const load = engine.load.bind(engine);
      engine.load = (spec, options) => {
        loaded.push(spec);
        return load(spec, options);
      };
      return engine;
    },
  };
}

let home: string;
before(() => {
  home = tempDir("kino-cli-generate-");
});
after(() => removeDir(home));

describe("kino generate over the FakeEngine", () => {
  test("--json prints exactly one JSON object on stdout: result, timings, model, resolved job", async () => {
    const ckpt = writeFakeCheckpoint(join(home, "json-ckpt"));
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--seed", "42", "--out", "j.mp4", "--json"], { home });
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.split("\n").filter((l) => l !== "");
    assert.equal(lines.length, 1, "one line on stdout");
    const doc = JSON.parse(lines[0]!);
    assert.equal(doc.ok, true);
    assert.equal(doc.model.name, ckpt);
    assert.equal(doc.model.noise, true, "a folder with kino_tiny.json is the tiny model");
    assert.deepEqual([doc.device, doc.dtype], ["cpu", "float32"]);
    assert.equal(doc.job.seed, 42);
    assert.deepEqual([doc.job.width, doc.job.height, doc.job.frames, doc.job.steps], [64, 48, 5, 3]);
    assert.equal(doc.job.negativePrompt, TINY_DEFAULTS.negativePrompt);
    assert.equal(doc.job.output.video, join(home, "j.mp4"));
    assert.equal(doc.result.frames, 5);
    for (const k of ["textEncodeMs", "denoiseMs", "decodeMs", "encodeMs", "totalMs", "loadMs", "wallMs"]) {
      assert.equal(typeof doc.timings[k], "number", `timings.${k}`);
    }
    assert.equal((await probeVideo(join(home, "j.mp4"))).frames, 5);
    assert.match(r.stderr, /the video is noise/);
  });

  test("the engine gets the hot path's options: measured attention, batched CFG, kino's cache folder; --compile asks for compile", async () => {
    const ckpt = writeFakeCheckpoint(join(home, "runtime-ckpt"));
    const engine = recordingEngine();
    const plain = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "rt.mp4"], { home, engine: engine.make });
    assert.equal(plain.code, 0, plain.stderr);
    const cache = resolveConfig({ KINO_HOME: home, HOME: home }).cache;
    assert.deepEqual(engine.loaded[0]?.runtime, { cfg: "auto", attention: "auto", compile: false, cacheDir: join(cache, "runtime") });
    const compiled = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "rt2.mp4", "--compile"], { home, engine: engine.make });
    assert.equal(compiled.code, 0, compiled.stderr);
    assert.equal(engine.loaded[1]?.runtime?.compile, true, "--compile did not reach the engine");
  });

  test("--preview keeps the latest preview in a PNG at the latents' size; --preview-every sets how often", async () => {
    const ckpt = writeFakeCheckpoint(join(home, "preview-ckpt"));
    const seen: number[] = [];
    const make = () => {
      const engine = new FakeEngine();
      const generate = engine.generate.bind(engine);
      engine.generate = (job, options) =>
        generate(job, { ...options, onEvent: (e) => (e.kind === "preview" && seen.push(e.i), options?.onEvent?.(e)) });
      return engine;
    };
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", "--size", "64x48", "--frames", "5", "--steps", "5", "--out", "p.mp4", "--preview", "p.png", "--preview-every", "2", "--json"], { home, engine: make });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout).job.preview, { every: 2 });
    assert.deepEqual(seen, [2, 4, 5], "every 2 steps and the last");
    assert.deepEqual(pngBytesSize(readFileSync(join(home, "p.png")), "the preview file"), { width: 8, height: 6 });
    assert.ok(!existsSync(join(home, "p.png.partial")), "no temporary left behind");

    const summary = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "q.mp4", "--preview", "q.png"], { home });
    assert.equal(summary.code, 0, summary.stderr);
    assert.ok(summary.stderr.includes(`preview ${join(home, "q.png")} (the last, every 1 steps)`), "3 steps: about ten per run means every step");

    const bad = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "b.mp4", "--preview", "b.jpg"], { home });
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /preview.*must be a file path ending in \.png/);
    const orphan = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "o.mp4", "--preview-every", "2"], { home });
    assert.equal(orphan.code, 2, orphan.stderr);
    assert.match(orphan.stderr, /add --preview FILE\.png/);
    const zero = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "z.mp4", "--preview", "z.png", "--preview-every", "0"], { home });
    assert.equal(zero.code, 2, zero.stderr);
    assert.match(zero.stderr, /preview-every|previewEvery/);
  });

  test("without --json: notices, plain progress lines off a terminal, and a closing summary on stderr", async () => {
    const ckpt = writeFakeCheckpoint(join(home, "text-ckpt"));
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "t.mp4", "--frames-dir", "t-frames"], { home });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "", "nothing on stdout");
    assert.match(r.stderr, /kino's tiny model with random weights: the video is noise/);
    assert.match(r.stderr, /device cpu \(float32\): the engine sees no CUDA GPU/);
    assert.match(r.stderr, /seed \d+ \(chosen at random; pass --seed \d+ to repeat\)/);
    assert.match(r.stderr, /denoise step 1\/3 .* s\/step {2}ETA \d+:\d\d\n/);
    assert.match(r.stderr, /denoise step 3\/3/);
    for (const phase of ["text encode", "denoise", "decode", "encode"]) assert.match(r.stderr, new RegExp(`${phase} done in [\\d.]+ s`));
    assert.match(r.stderr, /done in [\d.]+ s \(engine start and load/);
    assert.match(r.stderr, /text encode [\d.]+ s · denoise [\d.]+ s \([\d.]+ s\/step × 3\) · decode [\d.]+ s · encode [\d.]+ s/);
    assert.match(r.stderr, /peak VRAM n\/a \(cpu\) · peak RAM [\d.]+ (MiB|GiB)/);
    assert.ok(r.stderr.includes(`video  ${join(home, "t.mp4")} (5 frames, 64x48 at 16 fps)`));
    assert.ok(r.stderr.includes(`frames ${join(home, "t-frames")}/ (5 PNG)`));
    assert.equal(readdirSync(join(home, "t-frames")).length, 5);
    assert.ok(!r.stderr.includes("\r"), "no redrawing off a terminal");
  });

  test("on a terminal the progress line is redrawn in place with a bar", async () => {
    const ckpt = writeFakeCheckpoint(join(home, "tty-ckpt"));
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--out", "tty.mp4"], { home, tty: true });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /\r\x1b\[Kdenoise █+░* 1\/3 {2}[\d.]+ s\/step {2}ETA/);
    assert.match(r.stderr, /\r\x1b\[Kdenoise █+ 3\/3/);
  });

  test("auto with no GPU picks tiny, makes it on first use, and says why", async () => {
    const autoHome = tempDir("kino-auto-");
    const made: string[] = [];
    const makeTiny = async (dir: string) => {
      made.push(dir);
      writeFakeCheckpoint(dir);
      return { ok: true };
    };
    try {
      const first = await runKino(["generate", "--prompt", "a fox", ...SMALL, "--out", "a.mp4"], { home: autoHome, tools: { makeTiny } });
      assert.equal(first.code, 0, first.stderr);
      assert.match(first.stderr, /model auto → tiny: no CUDA GPU is present/);
      assert.match(first.stderr, /making kino's tiny model in .*models\/tiny/);
      assert.match(first.stderr, /the video is noise/);
      assert.equal(made.length, 1);
      assert.ok(existsSync(join(autoHome, "models", "tiny", "model_index.json")), "tiny lives in $KINO_HOME/models/tiny");
      assert.deepEqual(readdirSync(join(autoHome, "models")), ["tiny"], "no temporary folder is left");
      const second = await runKino(["generate", "--prompt", "a fox", ...SMALL, "--out", "b.mp4"], { home: autoHome, tools: { makeTiny } });
      assert.equal(second.code, 0, second.stderr);
      assert.equal(made.length, 1, "made once, then reused");
    } finally {
      removeDir(autoHome);
    }
  });

  test("auto with a GPU and the 1.3B weights present picks the 1.3B on cuda in bf16 with Wan's defaults", async () => {
    const gpuHome = tempDir("kino-auto-gpu-");
    try {
      writeFakeCheckpoint(join(gpuHome, "models", "wan2.1-t2v-1.3b"), { tiny: false });
      const engine = recordingEngine([GPU]);
      const r = await runKino(["generate", "--prompt", "a fox", "--size", "64x48", "--frames", "5", "--steps", "2", "--out", "g.mp4", "--json"], {
        home: gpuHome,
        engine: engine.make,
      });
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /model auto → wan2\.1-t2v-1\.3b: its weights are here and a CUDA GPU is present/);
      assert.match(r.stderr, /device cuda \(bfloat16\): the engine sees Fake H100/);
      assert.doesNotMatch(r.stderr, /random weights|video is noise/);
      const doc = JSON.parse(r.stdout);
      assert.deepEqual([doc.device, doc.dtype], ["cuda", "bfloat16"]);
      assert.equal(doc.job.negativePrompt, WAN_NEGATIVE_PROMPT);
      assert.equal(doc.job.shift, 3);
      assert.equal(doc.job.guidance, 5);
      assert.deepEqual(engine.loaded[0]?.source, { kind: "checkpoint", path: join(gpuHome, "models", "wan2.1-t2v-1.3b") });
    } finally {
      removeDir(gpuHome);
    }
  });

  test("auto with a GPU but no 1.3B weights picks tiny and says how to get the 1.3B", async () => {
    const h = tempDir("kino-auto-nodl-");
    try {
      writeFakeCheckpoint(join(h, "models", "tiny"));
      const r = await runKino(["generate", "--prompt", "a fox", ...SMALL, "--out", "a.mp4"], { home: h, engine: recordingEngine([GPU]).make });
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /model auto → tiny: wan2\.1-t2v-1\.3b is not downloaded \(kino models pull wan2\.1-t2v-1\.3b\)/);
    } finally {
      removeDir(h);
    }
  });

  test("--random-weights loads the catalog architecture (no download) and says timings only", async () => {
    const engine = recordingEngine();
    const r = await runKino(["generate", "--model", "wan2.1-t2v-14b", "--random-weights", "--prompt", "a fox", ...SMALL, "--seed", "5", "--out", "rw.mp4"], {
      home,
      engine: engine.make,
    });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /wan2\.1-t2v-14b with random weights: for timings only, the video is noise/);
    const source = engine.loaded[0]?.source;
    assert.equal(source?.kind, "random");
    assert.equal(source?.kind === "random" && source.architecture.transformer.num_layers, 40);
    assert.equal(source?.kind === "random" && source.seed, 5);
  });

  test("--device cuda without a GPU is refused with DEVICE_UNAVAILABLE naming --device, before loading", async () => {
    const engine = recordingEngine();
    const ckpt = writeFakeCheckpoint(join(home, "cuda-ckpt"));
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--device", "cuda", "--out", "c.mp4"], { home, engine: engine.make });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^kino: --device: cuda was asked for but the engine sees no CUDA GPU; use --device cpu \[DEVICE_UNAVAILABLE\]/m);
    assert.equal(engine.loaded.length, 0);
  });

  test("explicit --device cpu --dtype bf16 and --fps reach the engine as asked", async () => {
    const engine = recordingEngine([GPU]);
    const ckpt = writeFakeCheckpoint(join(home, "explicit-ckpt"));
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", ...SMALL, "--device", "cpu", "--dtype", "bf16", "--fps", "8", "--out", "e.mp4", "--json"], {
      home,
      engine: engine.make,
    });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual([engine.loaded[0]?.device, engine.loaded[0]?.dtype], ["cpu", "bfloat16"]);
    assert.equal(JSON.parse(r.stdout).job.fps, 8);
    assert.equal((await probeVideo(join(home, "e.mp4"))).fps, 8);
  });

  test("Ctrl-C mid-job cancels between steps: exit 130, nothing written", async () => {
    const ckpt = writeFakeCheckpoint(join(home, "cancel-ckpt"));
    const controller = new AbortController();
    const make = () => {
      const engine = new FakeEngine({ stepMs: 20 });
      const generate = engine.generate.bind(engine);
      engine.generate = (job, options) =>
        generate(job, {
          ...options,
          onEvent: (e) => {
            options?.onEvent?.(e);
            if (e.kind === "step" && e.i === 2) controller.abort(); // the user presses Ctrl-C
          },
        });
      return engine;
    };
    mkdirSync(join(home, "cancel-out"));
    const r = await runKino(["generate", "--model", ckpt, "--prompt", "a fox", "--size", "64x48", "--frames", "5", "--steps", "100", "--out", "cancel-out/c.mp4"], {
      home,
      engine: make,
      signal: controller.signal,
    });
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stderr, /\[CANCELLED\]/);
    assert.doesNotMatch(r.stderr, /denoise step 10\//, "it stopped right after the cancel");
    assert.deepEqual(readdirSync(join(home, "cancel-out")), [], "no video and no temporary file");
  });
});
