/**
 * The behaviour every EngineClient shares, as one suite run against each implementation (the
 * in-process FakeEngine and the Python SubprocessEngine): what the layers above the seam rely on.
 */
import assert from "node:assert/strict";
import { cpSync, existsSync, readdirSync, readFileSync, statSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { EngineClient } from "../src/engine/client.ts";
import { KinoError } from "../src/errors.ts";
import { probeVideo } from "../src/media/ffprobe.ts";
import { PNG } from "pngjs";
import {
  ClearCacheResult,
  GenerateResult,
  HelloResult,
  LoadResult,
  PROTOCOL_VERSION,
  PrewarmResult,
  ProbeResult,
  type EngineEvent,
  type JobSpec,
  type ModelSpec,
} from "../src/protocol/engine.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

export interface ConformanceTarget {
  /** Starts a fresh engine. */
  start(): Promise<EngineClient>;
  /** A checkpoint folder the engine loads (left untouched: tests copy it to damage it). */
  readonly checkpoint: string;
  /** A job small enough to run in seconds: size, frames, steps. */
  readonly job: Pick<JobSpec, "width" | "height" | "frames" | "steps">;
  /** Steps of the job the cancel test interrupts: enough that it cannot finish first. */
  readonly cancelSteps: number;
  cleanup(): Promise<void>;
}

/** Asserts that `promise` rejects with a KinoError of `code`; returns the error for more checks. */
export async function rejectsWith(promise: Promise<unknown>, code: string): Promise<KinoError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof KinoError, `expected a KinoError ${code}, got ${String(err)}`);
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    return err;
  }
  assert.fail(`expected a rejection with ${code}, but it resolved`);
}

/** Checks the event stream of one generate: phases in order as start/end pairs, steps 1..n inside denoise. */
export function assertGenerateEvents(events: readonly EngineEvent[], steps: number): void {
  const phases = events.filter((e) => e.kind === "phase").map((e) => `${e.phase}:${e.state}`);
  assert.deepEqual(
    phases,
    ["text_encode:start", "text_encode:end", "denoise:start", "denoise:end", "decode:start", "decode:end", "encode:start", "encode:end"],
    "phase events must come as start/end pairs in pipeline order",
  );
  for (const e of events) if (e.kind === "phase" && e.state === "end") assert.ok(e.ms !== null && e.ms >= 0, `phase ${e.phase} end carries its duration`);
  const denoiseStart = events.findIndex((e) => e.kind === "phase" && e.phase === "denoise" && e.state === "start");
  const denoiseEnd = events.findIndex((e) => e.kind === "phase" && e.phase === "denoise" && e.state === "end");
  const stepIdx = events.flatMap((e, idx) => (e.kind === "step" ? [idx] : []));
  const stepEvents = events.filter((e) => e.kind === "step");
  assert.deepEqual(
    stepEvents.map((e) => e.i),
    Array.from({ length: steps }, (_, k) => k + 1),
    "one step event per step, numbered 1..n",
  );
  for (const e of stepEvents) assert.equal(e.n, steps);
  assert.ok(stepIdx.every((idx) => idx > denoiseStart && idx < denoiseEnd), "step events come between denoise start and end");
}

/** Width and height from a PNG's IHDR chunk. */
function pngSize(file: string): { width: number; height: number } {
  return pngBytesSize(readFileSync(file), file);
}

/** Width and height from the IHDR chunk of a PNG's bytes (the signature, then IHDR first). */
export function pngBytesSize(bytes: Buffer, what = "the image"): { width: number; height: number } {
  assert.deepEqual([...bytes.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], `${what} has the PNG signature`);
  assert.equal(bytes.toString("latin1", 12, 16), "IHDR", `${what} starts with its IHDR chunk`);
  return { width: bytes.readUInt32BE(16), height: bytes.readUInt32BE(20) };
}

/** The steps a job of `steps` steps previews at with `every`: each every-th, and the last. */
export function previewSteps(every: number, steps: number): number[] {
  return Array.from({ length: steps }, (_, k) => k + 1).filter((i) => i % every === 0 || i === steps);
}

/**
 * Checks a job's preview events: at the steps `every` asks for, inside the denoise phase, each a
 * whole 8-bit RGB PNG (it decodes) whose IHDR says the event's size, the latents' (`vaeScale`
 * pixels per latent pixel).
 */
function assertPreviews(events: readonly EngineEvent[], every: number, size: { width: number; height: number; steps: number }, vaeScale: number): void {
  const previews = events.filter((e) => e.kind === "preview");
  assert.deepEqual(previews.map((e) => e.i), previewSteps(every, size.steps), `previews every ${every} of ${size.steps} steps, and at the last`);
  const denoiseStart = events.findIndex((e) => e.kind === "phase" && e.phase === "denoise" && e.state === "start");
  const denoiseEnd = events.findIndex((e) => e.kind === "phase" && e.phase === "denoise" && e.state === "end");
  for (const e of previews) {
    const at = events.indexOf(e);
    assert.ok(at > denoiseStart && at < denoiseEnd, `the preview of step ${e.i} comes while denoising`);
    assert.deepEqual([e.n, e.width, e.height], [size.steps, size.width / vaeScale, size.height / vaeScale], "the latents' size");
    const png = Buffer.from(e.png, "base64");
    assert.deepEqual(pngBytesSize(png, `the preview of step ${e.i}`), { width: e.width, height: e.height }, "its IHDR says the event's size");
    const decoded = PNG.sync.read(png);
    assert.deepEqual([decoded.width, decoded.height, decoded.data.length], [e.width, e.height, e.width * e.height * 4], "a whole image");
  }
}

export function engineConformance(name: string, makeTarget: () => Promise<ConformanceTarget>): void {
  describe(`EngineClient conformance: ${name}`, { timeout: 180_000 }, () => {
    let target: ConformanceTarget;
    let engine: EngineClient;
    let scratch: string;
    /** Pixels per latent pixel on a side, as the engine's load reported it. */
    let vaeScale = 0;
    const model = (path: string): ModelSpec => ({ name: "conformance", source: { kind: "checkpoint", path }, device: "cpu", dtype: "float32" });
    const job = (out: string, over: Partial<JobSpec> = {}): JobSpec => ({
      prompt: "a red fox running through snow",
      negativePrompt: "",
      ...target.job,
      guidance: 5,
      shift: null,
      seed: 7,
      fps: null,
      output: { video: out, framesDir: null },
      ...over,
    });

    before(async () => {
      target = await makeTarget();
      engine = await target.start();
      scratch = tempDir("kino-conformance-");
    });
    after(async () => {
      await engine?.close();
      await target?.cleanup();
      if (scratch) removeDir(scratch);
    });

    test("hello reports our protocol version, versions, devices and an H.264 encoder", async () => {
      const hello = await engine.hello();
      HelloResult.parse(hello);
      assert.equal(hello.protocol, PROTOCOL_VERSION);
      assert.equal(hello.encoder.h264, true, "the engine must be able to write H.264");
      assert.ok(hello.hostRamBytes > 0);
    });

    test("probe measures the engine's device: a valid result, GPU fields as hello's devices say", async () => {
      const hello = await engine.hello();
      const probe = ProbeResult.parse(await engine.probe({ quick: true }));
      assert.equal(probe.quick, true);
      assert.ok(probe.hostRamBytes > 0 && probe.pinnedLimitBytes > 0 && probe.pinnedLimitBytes <= probe.hostRamBytes);
      assert.ok(probe.cpuGemm.flopsPerS > 0, "the host's GEMM rate is measured everywhere");
      const gpu = hello.devices[0];
      if (gpu === undefined) {
        assert.equal(probe.device, "cpu");
        assert.deepEqual([probe.vramTotalBytes, probe.h2dBytesPerS, probe.gemm, probe.attention], [null, null, [], []], "no GPU: its fields are null or empty");
      } else {
        assert.equal(probe.name, gpu.name, "the probe measures the device hello reports first");
        assert.ok(probe.h2dBytesPerS !== null && probe.gemm.length > 0 && probe.attention.length > 0);
      }
    });

    test("generate and prewarm before load answer MODEL_NOT_LOADED", async () => {
      await rejectsWith(engine.generate(job(join(scratch, "early.mp4"))), "MODEL_NOT_LOADED");
      assert.equal(existsSync(join(scratch, "early.mp4")), false);
      await rejectsWith(engine.prewarm(job(join(scratch, "early.mp4"))), "MODEL_NOT_LOADED");
    });

    test("a folder without model_index.json answers BAD_CHECKPOINT", async () => {
      const empty = tempDir("kino-empty-ckpt-");
      try {
        await rejectsWith(engine.load(model(empty)), "BAD_CHECKPOINT");
      } finally {
        removeDir(empty);
      }
    });

    test("a truncated safetensors file answers BAD_CHECKPOINT naming the file", async () => {
      const broken = join(scratch, "broken-ckpt");
      cpSync(target.checkpoint, broken, { recursive: true });
      const dir = join(broken, "transformer");
      const file = readdirSync(dir).find((f) => f.endsWith(".safetensors"));
      assert.ok(file !== undefined, "the checkpoint has a transformer safetensors file");
      truncateSync(join(dir, file), Math.floor(statSync(join(dir, file)).size / 2));
      const err = await rejectsWith(engine.load(model(broken)), "BAD_CHECKPOINT");
      assert.match(err.message, new RegExp(file.replace(".", "\\.")), "the message names the broken file");
      removeDir(broken);
    });

    test("load, then generate: events in order, a valid result, a real H.264 video", async () => {
      const loaded = await engine.load(model(target.checkpoint));
      LoadResult.parse(loaded);
      vaeScale = loaded.vaeScaleSpatial;
      assert.equal(loaded.device, "cpu");
      assert.equal(loaded.dtype, "float32");
      const events: EngineEvent[] = [];
      const out = join(scratch, "first.mp4");
      const result = await engine.generate(job(out), { onEvent: (e) => events.push(e) });
      GenerateResult.parse(result);
      assertGenerateEvents(events, target.job.steps);
      assert.equal(result.output.video, out);
      assert.equal(result.output.framesDir, null);
      assert.deepEqual([result.width, result.height, result.frames], [target.job.width, target.job.height, target.job.frames]);
      assert.equal(result.fps, loaded.fps, "with fps null the video takes the model's rate");
      const probe = await probeVideo(out);
      assert.equal(probe.codec, "h264");
      assert.equal(probe.pixFmt, "yuv420p");
      assert.deepEqual([probe.width, probe.height, probe.frames], [target.job.width, target.job.height, target.job.frames]);
      assert.ok(Math.abs(probe.fps - result.fps) < 0.01, `video at ${probe.fps} fps, result says ${result.fps}`);
      assert.deepEqual(readdirSync(scratch).filter((f) => f.startsWith(".")), [], "no temporary files are left behind");
    });

    test("prewarm: one forward at the job's shape for a batch of that many jobs, nothing written", async () => {
      const out = join(scratch, "prewarm.mp4");
      const warm = PrewarmResult.parse(await engine.prewarm({ ...job(out), preview: { every: 1 } }, 2));
      assert.equal(warm.jobs, 2);
      assert.ok(warm.ms > 0, `a forward takes time: ${warm.ms} ms`);
      assert.equal(existsSync(out), false, "a prewarm writes no output");
    });

    test("frames dir: one PNG per frame at the job's size, and the asked fps", async () => {
      const frames = join(scratch, "frames");
      const out = join(scratch, "with-frames.mp4");
      const result = await engine.generate(job(out, { fps: 8, output: { video: out, framesDir: frames } }));
      assert.equal(result.output.framesDir, frames);
      assert.equal(result.fps, 8);
      const pngs = readdirSync(frames).sort();
      assert.deepEqual(pngs, Array.from({ length: target.job.frames }, (_, k) => `frame_${String(k).padStart(5, "0")}.png`));
      assert.deepEqual(pngSize(join(frames, pngs[0]!)), { width: target.job.width, height: target.job.height });
      assert.equal((await probeVideo(out)).fps, 8);
    });

    test("prompt cache: repeated prompts are not re-encoded; clearCache empties it", async () => {
      // The earlier generates used the same prompt and negative prompt (guidance 5: both encoded).
      const warm = await engine.generate(job(join(scratch, "warm.mp4")));
      assert.deepEqual(warm.cache, { promptHits: 2, promptMisses: 0 }, "a warm request must not run the text encoder again");
      const changed = await engine.generate(job(join(scratch, "new-prompt.mp4"), { prompt: "a blue whale in deep water" }));
      assert.deepEqual(changed.cache, { promptHits: 1, promptMisses: 1 }, "only the new prompt is encoded; the negative one is served");
      const cleared = await engine.clearCache();
      ClearCacheResult.parse(cleared);
      assert.ok(cleared.freedBytes > 0, "the cache held the embeddings of three prompts");
      assert.deepEqual(await engine.clearCache(), { freedBytes: 0 }, "a cleared cache holds nothing");
      const cold = await engine.generate(job(join(scratch, "cold.mp4"), { guidance: 1 }));
      assert.deepEqual(cold.cache, { promptHits: 0, promptMisses: 1 }, "after clearCache the prompt is encoded again (no CFG: only it)");
    });

    test("previews: every `every` steps and at the last, a PNG of the latents' size; none unless asked", async () => {
      const events: EngineEvent[] = [];
      await engine.generate(job(join(scratch, "previews.mp4"), { preview: { every: 3 } }), { onEvent: (e) => events.push(e) });
      assertGenerateEvents(events, target.job.steps);
      assertPreviews(events, 3, target.job, vaeScale);
      const none: EngineEvent[] = [];
      await engine.generate(job(join(scratch, "no-previews.mp4")), { onEvent: (e) => none.push(e) });
      assert.deepEqual(none.filter((e) => e.kind === "preview"), [], "a job that asks for none gets none");
    });

    test("previews in a batch: each job's own, only for the jobs that ask", async () => {
      const outs = [join(scratch, "batch-previews-0.mp4"), join(scratch, "batch-previews-1.mp4")];
      const events: EngineEvent[][] = outs.map(() => []);
      const answers = engine.generateBatch([
        { job: job(outs[0]!, { seed: 40, preview: { every: 2 } }), onEvent: (e: EngineEvent) => events[0]!.push(e) },
        { job: job(outs[1]!, { seed: 41 }), onEvent: (e: EngineEvent) => events[1]!.push(e) },
      ]);
      for (const result of await Promise.all(answers)) assert.equal(result.batchSize, 2, "one loop for both");
      assertPreviews(events[0]!, 2, target.job, vaeScale);
      assert.deepEqual(events[1]!.filter((e) => e.kind === "preview"), [], "the job that asked for none gets none");
    });

    test("an output in a missing folder answers OUTPUT_UNWRITABLE naming the field", async () => {
      const err = await rejectsWith(engine.generate(job(join(scratch, "no", "such", "dir.mp4"))), "OUTPUT_UNWRITABLE");
      assert.equal(err.field, "job.output.video");
    });

    test("cancel mid-job answers CANCELLED, leaves nothing written, and the engine still works", async () => {
      const out = join(scratch, "cancelled.mp4");
      const controller = new AbortController();
      const steps: number[] = [];
      const err = await rejectsWith(
        engine.generate(job(out, { steps: target.cancelSteps }), {
          signal: controller.signal,
          onEvent: (e) => {
            if (e.kind === "step") {
              steps.push(e.i);
              controller.abort();
            }
          },
        }),
        "CANCELLED",
      );
      assert.ok(steps.length >= 1 && steps.length < target.cancelSteps, `cancelled between steps (saw ${steps.length})`);
      assert.equal(err.phase, "denoise");
      assert.equal(existsSync(out), false, "a cancelled job writes no video");
      const again = join(scratch, "after-cancel.mp4");
      const result = await engine.generate(job(again));
      assert.equal((await probeVideo(again)).frames, result.frames);
    });

    test("generateBatch: jobs of one shape, each with its own events, result and video", async () => {
      const outs = [join(scratch, "batch-0.mp4"), join(scratch, "batch-1.mp4")];
      const events: EngineEvent[][] = outs.map(() => []);
      const answers = engine.generateBatch(
        outs.map((out, k) => ({ job: job(out, { seed: 20 + k, prompt: `batch job ${k}` }), onEvent: (e: EngineEvent) => events[k]!.push(e) })),
      );
      assert.equal(answers.length, 2, "one answer per job");
      const results = await Promise.all(answers);
      for (const [k, result] of results.entries()) {
        GenerateResult.parse(result);
        assertGenerateEvents(events[k]!, target.job.steps);
        assert.equal(result.output.video, outs[k], `job ${k} answers with its own output`);
        assert.equal(result.batchSize, 2, "each job says it shared its loop with the other");
        assert.deepEqual(result.cache, { promptHits: 1, promptMisses: 1 }, `job ${k}'s own prompt is new; the negative one, the earlier tests', is served`);
        assert.equal((await probeVideo(outs[k]!)).frames, target.job.frames);
      }
    });

    test("generateBatch: a job cancelled mid-batch is answered at once while the other runs on; both stop when both are cancelled", async () => {
      const outs = [join(scratch, "batch-cancel-0.mp4"), join(scratch, "batch-cancel-1.mp4")];
      const controllers = outs.map(() => new AbortController());
      const steps = [0, 0];
      let stepsOfZeroWhenOneEnded: number | null = null;
      const answers = engine.generateBatch(
        outs.map((out, k) => ({
          job: job(out, { steps: target.cancelSteps, seed: 30 + k }),
          signal: controllers[k]!.signal,
          onEvent: (e: EngineEvent) => {
            if (e.kind !== "step") return;
            steps[k]!++;
            if (k === 1 && e.i === 1) controllers[1]!.abort();
            // Job 0 runs on after job 1 was answered; then it is cancelled too, to end the test.
            if (k === 0 && stepsOfZeroWhenOneEnded !== null && steps[0]! >= stepsOfZeroWhenOneEnded + 3) controllers[0]!.abort();
          },
        })),
      );
      const one = await rejectsWith(answers[1]!, "CANCELLED");
      stepsOfZeroWhenOneEnded = steps[0]!;
      assert.equal(one.phase, "denoise");
      assert.ok(stepsOfZeroWhenOneEnded < target.cancelSteps, "job 1 is answered during the loop, not at its end");
      const zero = await rejectsWith(answers[0]!, "CANCELLED");
      assert.equal(zero.phase, "denoise");
      assert.ok(steps[0]! >= stepsOfZeroWhenOneEnded + 3, `job 0 ran on after job 1 ended (${stepsOfZeroWhenOneEnded} → ${steps[0]} steps)`);
      assert.ok(steps[1]! < target.cancelSteps && steps[0]! < target.cancelSteps);
      for (const out of outs) assert.equal(existsSync(out), false, "a cancelled job writes no video");
      const again = join(scratch, "after-batch-cancel.mp4");
      assert.equal((await probeVideo((await engine.generate(job(again))).output.video!)).frames, target.job.frames);
    });

    test("generateBatch: jobs of different shapes are refused before reaching the engine, naming the field", async () => {
      const out = (k: number) => join(scratch, `mismatch-${k}.mp4`);
      const answers = engine.generateBatch([{ job: job(out(0)) }, { job: job(out(1), { width: target.job.width + 16 }) }]);
      for (const answer of answers) {
        const err = await rejectsWith(answer, "INTERNAL");
        assert.equal(err.field, "jobs.1.job.width");
      }
      assert.equal(existsSync(out(0)), false);
    });

    test("an already aborted signal rejects with CANCELLED without running", async () => {
      const out = join(scratch, "never.mp4");
      await rejectsWith(engine.generate(job(out), { signal: AbortSignal.abort() }), "CANCELLED");
      assert.equal(existsSync(out), false);
    });

    test("close during a job ends the job (CANCELLED, or ENGINE_CLOSED if killed) without hanging or writing it", async () => {
      const second = await target.start();
      await second.load(model(target.checkpoint));
      const out = join(scratch, "closed-mid-job.mp4");
      let closing: Promise<void> | undefined;
      const outcome = second
        .generate(job(out, { steps: target.cancelSteps }), {
          onEvent: (e) => {
            if (e.kind === "step" && closing === undefined) closing = second.close();
          },
        })
        .then(
          () => "finished",
          (err: KinoError) => err.code,
        );
      assert.ok(["CANCELLED", "ENGINE_CLOSED"].includes(await outcome), `the job ended with ${await outcome}`);
      await closing;
      assert.equal(existsSync(out), false);
    });

    test("close is idempotent and later requests answer ENGINE_CLOSED", async () => {
      const second = await target.start();
      await second.hello();
      await Promise.all([second.close(), second.close()]);
      await second.close();
      await rejectsWith(second.hello(), "ENGINE_CLOSED");
    });
  });
}
