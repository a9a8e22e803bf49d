/**
 * `kino generate` on a GPU plans its memory: --vram reaches the engine as placements and a cap, the
 * plan's decode and CFG reach the job, an out-of-memory error retries once with a safer plan, and
 * the peaks the engine measured are logged and correct the next plan (planner/learn.ts).
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { resolveConfig } from "../src/config/config.ts";
import { WAN21_T2V_14B } from "../src/catalog/wan21.ts";
import type { EngineClient } from "../src/engine/client.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { KinoError } from "../src/errors.ts";
import { GiB, H100_80GB } from "../src/planner/hardware.ts";
import { CLAMP, corrections, LOOKBACK, PeakLog, peakRecords, type PeakRecord } from "../src/planner/learn.ts";
import { modelManifest } from "../src/planner/manifest.ts";
import { plan } from "../src/planner/plan.ts";
import type { DeviceInfo, GenerateResult, JobSpec, ModelSpec } from "../src/protocol/engine.ts";
import { runKino } from "./fixtures/cli.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const GPU: DeviceInfo = { index: 0, name: "Fake H100", totalBytes: 80 * GiB, freeBytes: 79 * GiB, capability: "9.0" };
const M14 = modelManifest("wan2.1-t2v-14b", WAN21_T2V_14B);
const R480 = { width: 832, height: 480, frames: 81, steps: 50, guidance: 5 };
const RUN = ["generate", "--model", "wan2.1-t2v-14b", "--random-weights", "--prompt", "a fox", "--size", "832x480", "--frames", "81", "--steps", "2", "--seed", "1"];

/** The fake reports this machine's RAM; the plans under test assume a GPU server's 128 GiB. */
function withHostRam<T extends EngineClient>(engine: T): T {
  const hello = engine.hello.bind(engine);
  engine.hello = async () => ({ ...(await hello()), hostRamBytes: 128 * GiB, hostRamAvailableBytes: 120 * GiB });
  return engine;
}

interface Recorder {
  make: () => EngineClient;
  loads: ModelSpec[];
  jobs: JobSpec[];
}

/** A FakeEngine on a fake GPU that records loads and jobs, reports per-phase peaks, and can fail the first generate with OOM. */
function recorder(options: { oomFirst?: boolean; peaks?: GenerateResult["phasePeakVramBytes"] } = {}): Recorder {
  const loads: ModelSpec[] = [];
  const jobs: JobSpec[] = [];
  let failed = false;
  return {
    loads,
    jobs,
    make: () => {
      const engine = withHostRam(new FakeEngine({ devices: [GPU] }));
      const load = engine.load.bind(engine);
      const generate = engine.generate.bind(engine);
      engine.load = (spec, o) => (loads.push(spec), load(spec, o));
      engine.generate = async (job, o) => {
        jobs.push(job);
        if (options.oomFirst && !failed) {
          failed = true;
          throw new KinoError("OOM", "out of memory during decode: CUDA out of memory", { phase: "decode" });
        }
        const result = await generate({ ...job, width: 64, height: 48, frames: 5 }, o);
        return { ...result, phasePeakVramBytes: options.peaks ?? null };
      };
      return engine;
    },
  };
}

describe("generate plans GPU memory", () => {
  const homes: string[] = [];
  after(() => homes.forEach(removeDir));
  const home = () => {
    const h = tempDir("kino-genplan-");
    homes.push(h);
    return h;
  };

  test("--vram 8GB: the 14B streams its blocks, the engine gets the cap, the job the plan's decode and CFG", async () => {
    const h = home();
    const r = recorder();
    const run = await runKino([...RUN, "--vram", "8GB", "--out", join(h, "a.mp4")], { home: h, engine: r.make });
    assert.equal(run.code, 0, run.stderr);
    const memory = r.loads[0]!.memory!;
    assert.equal(memory.transformer.kind, "streamed");
    assert.equal(memory.vramBudget, 8 * GiB);
    assert.equal(memory.textEncoder.kind, "cpu", "UMT5-XXL (10.6 GiB) cannot visit an 8 GB card");
    assert.deepEqual(r.jobs[0]!.vaeDecode, { mode: "tiled", tile: 256 });
    assert.match(run.stderr, /plan: text encoder on CPU, transformer block-streamed/);
  });

  test("no budget on an 80 GB card: everything resident, no tiling", async () => {
    const h = home();
    const r = recorder();
    const run = await runKino([...RUN, "--out", join(h, "a.mp4")], { home: h, engine: r.make });
    assert.equal(run.code, 0, run.stderr);
    const memory = r.loads[0]!.memory!;
    assert.deepEqual([memory.textEncoder.kind, memory.transformer.kind, memory.vae.kind], ["resident", "resident", "resident"]);
    assert.deepEqual(r.jobs[0]!.vaeDecode, { mode: "full" });
    assert.equal(r.jobs[0]!.cfg, "sequential", "at 14B 480p one sample saturates the GPU: two batch-1 forwards (batchedCfgFactor)");
  });

  test("an out-of-memory error retries once with a safer plan and says why", async () => {
    const h = home();
    const r = recorder({ oomFirst: true });
    const run = await runKino([...RUN, "--vram", "24GB", "--out", join(h, "a.mp4")], { home: h, engine: r.make });
    assert.equal(run.code, 0, run.stderr);
    assert.equal(r.loads.length, 2, "the retry loads again with the safer plan");
    assert.equal(r.jobs.length, 2);
    assert.match(run.stderr, /out of memory during decode; retrying once with a safer plan \(25% of the budget kept free\)/);
    const hardware = { ...H100_80GB, name: GPU.name, vramFree: GPU.freeBytes, vramTotal: GPU.totalBytes, hostRam: 128 * GiB, pinnedLimit: 64 * GiB };
    const safer = plan(M14, hardware, { ...R480, steps: 2 }, { vram: 24 * GiB, margin: 0.25 });
    assert.deepEqual(r.loads[1]!.memory!.transformer, safer.placement.transformer);
  });

  test("a second OOM fails with the engine's error", async () => {
    const h = home();
    const failing = (): EngineClient => {
      const engine = withHostRam(new FakeEngine({ devices: [GPU] }));
      engine.generate = () => Promise.reject(new KinoError("OOM", "out of memory during denoise", { phase: "denoise" }));
      return engine;
    };
    const run = await runKino([...RUN, "--vram", "24GB", "--out", join(h, "a.mp4")], { home: h, engine: failing });
    assert.notEqual(run.code, 0);
    assert.match(run.stderr, /out of memory during denoise/);
  });

  test("measured peaks are logged and correct the next plan", async () => {
    const h = home();
    const r = recorder({ peaks: { textEncode: 13 * GiB, denoise: 30 * GiB, decode: 40 * GiB } });
    for (const out of ["a.mp4", "b.mp4"]) {
      const run = await runKino([...RUN, "--out", join(h, out)], { home: h, engine: r.make });
      assert.equal(run.code, 0, run.stderr);
    }
    const log = new PeakLog(join(resolveConfig({ KINO_HOME: h, HOME: h }).home, "planner", "peaks.jsonl"));
    const records = await log.read();
    assert.equal(records.length, 6, `three phases per run: ${JSON.stringify(records.map((r) => [r.phase, r.plan]))}`);
    const c = corrections(records, "wan2.1-t2v-14b", GPU.name);
    assert.ok(c.denoise! < 1 && c.decode! < 1, `measured below prediction must lower it: ${JSON.stringify(c)}`);
    // The second run planned with the first run's corrections: its stored predictions are uncorrected, so they equal the first's.
    assert.equal(records[0]!.predicted, records[3]!.predicted);
  });

  test("--precision reaches the engine's runtime; auto stays exact when exact fits", async () => {
    const h = home();
    const r = recorder();
    const run = await runKino([...RUN, "--precision", "fp8", "--out", join(h, "a.mp4")], { home: h, engine: r.make });
    assert.equal(run.code, 0, run.stderr);
    assert.equal(r.loads[0]!.runtime!.weights, "fp8");
    assert.match(run.stderr, /linears fp8 \(lossy: 4\.4% from exact\)/);
    const auto = recorder();
    const again = await runKino([...RUN, "--precision", "auto", "--out", join(h, "b.mp4")], { home: h, engine: auto.make });
    assert.equal(again.code, 0, again.stderr);
    assert.equal(auto.loads[0]!.runtime!.weights, "exact");
  });

  test("budgets on the CPU or a bad size are refused naming the field", async () => {
    const h = home();
    const cpu = await runKino(["generate", "--model", "tiny", "--prompt", "p", "--vram", "8GB", "--out", join(h, "a.mp4")], { home: h, engine: () => new FakeEngine() });
    assert.equal(cpu.code, 2, cpu.stderr);
    assert.match(cpu.stderr, /vram.*CPU|CPU.*vram/i);
    const bad = await runKino([...RUN, "--vram", "lots", "--out", join(h, "a.mp4")], { home: h, engine: recorder().make });
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /vram/);
  });
});

describe("learned corrections", () => {
  const rec = (phase: PeakRecord["phase"], predicted: number, measured: number, model = "m", hardware = "h"): PeakRecord => ({
    at: "2026-11-22T00:00:00Z", model, hardware, request: { width: 1, height: 1, frames: 1 }, plan: "p", phase, predicted, measured,
  });

  test("median per phase, per model and GPU, over the last runs, clamped", () => {
    const records = [
      rec("denoise", 10, 9), rec("denoise", 10, 11), rec("denoise", 10, 9.5),
      rec("decode", 10, 100), // one wild run is clamped
      rec("denoise", 10, 30, "other"), rec("denoise", 10, 30, "m", "other-gpu"),
    ];
    const c = corrections(records, "m", "h");
    assert.equal(c.denoise, 0.95);
    assert.equal(c.decode, CLAMP[1]);
    assert.equal(c.textEncode, undefined);
    const many = [...Array.from({ length: LOOKBACK }, () => rec("denoise", 10, 12)), ...Array.from({ length: 5 }, () => rec("denoise", 10, 8))];
    assert.equal(corrections(many, "m", "h").denoise, 1.2, "only the last LOOKBACK runs count (20 of 25)");
  });

  test("a correction raises the predicted peak and can change the plan", () => {
    const fixed = plan(M14, H100_80GB, R480, { memoryLevel: 0 });
    const fixedRaised = plan(M14, H100_80GB, R480, { memoryLevel: 0, corrections: { denoise: 1.3 } });
    assert.ok(Math.abs(fixedRaised.predicted.phases.denoise.vram / fixed.predicted.phases.denoise.vram - 1.3) < 1e-9);
    assert.equal(fixedRaised.predicted.phases.decode.vram, fixed.predicted.phases.decode.vram);
    const base = plan(M14, H100_80GB, R480, { vram: 24 * GiB });
    const raised = plan(M14, H100_80GB, R480, { vram: 24 * GiB, corrections: { denoise: 1.3 } });
    assert.notDeepEqual(raised.placement, base.placement, "under 24 GB the larger denoise peak needs another plan");
    assert.ok(raised.predicted.peakVram <= raised.budget.usableVram, "never above the budget");
    assert.ok(raised.residentBytes <= base.residentBytes, "a larger predicted peak never keeps more on the device");
    assert.match(raised.reasons.join("\n"), /denoise ×1\.300/);
    const records = peakRecords(raised, { denoise: 5 * GiB });
    assert.equal(records.length, 1);
    assert.ok(Math.abs(records[0]!.predicted - raised.predicted.phases.denoise.vram / 1.3) < 1, "the stored prediction is uncorrected");
  });

  test("the log skips torn lines and appends whole records", async () => {
    const dir = tempDir("kino-peaklog-");
    try {
      const log = new PeakLog(join(dir, "sub", "peaks.jsonl"));
      assert.deepEqual(await log.read(), []);
      await log.append([rec("denoise", 1, 2)]);
      writeFileSync(log.path, '{"torn": tr\n', { flag: "a" });
      await log.append([rec("decode", 1, 3)]);
      const back = await log.read();
      assert.deepEqual(back.map((r) => r.phase), ["denoise", "decode"]);
    } finally {
      removeDir(dir);
    }
  });
});

describe("generate plans with this machine's probed rates when they are cached", () => {
  test("a cached probe with a slow link keeps more blocks resident than the H100 preset under the same budget", async () => {
    const h = tempDir("kino-genprobe-");
    try {
      const { probeLike } = await import("./fixtures/probe-result.ts");
      const { probeCacheFor } = await import("../src/api/probe.ts");
      const { probeKey } = await import("../src/planner/probe-cache.ts");
      const config = resolveConfig({ KINO_HOME: h, HOME: h, XDG_CACHE_HOME: join(h, "xdg") });
      const engine = withHostRam(new FakeEngine({ devices: [GPU] }));
      const hello = await engine.hello();
      await engine.close();
      await probeCacheFor(config).write(probeKey(hello), probeLike(H100_80GB, { name: GPU.name, h2dBytesPerS: 2e9, d2hBytesPerS: 2e9 }));
      const slow = recorder();
      const run = await runKino([...RUN, "--vram", "24GB", "--out", join(h, "a.mp4")], { home: h, engine: slow.make, config: { cache: config.cache } });
      assert.equal(run.code, 0, run.stderr);
      const preset = plan(M14, { ...H100_80GB, name: GPU.name, vramFree: GPU.freeBytes, vramTotal: GPU.totalBytes, hostRam: 128 * GiB, pinnedLimit: 64 * GiB }, { ...R480, steps: 2 }, { vram: 24 * GiB });
      const got = slow.loads[0]!.memory!.transformer;
      assert.equal(got.kind, "streamed");
      assert.equal(preset.placement.transformer.kind, "streamed");
      if (got.kind === "streamed" && preset.placement.transformer.kind === "streamed") {
        assert.ok(got.residentBlocks > preset.placement.transformer.residentBlocks, `a 2 GB/s link must keep more blocks resident: ${got.residentBlocks} vs ${preset.placement.transformer.residentBlocks}`);
      }
    } finally {
      removeDir(h);
    }
  });
});
