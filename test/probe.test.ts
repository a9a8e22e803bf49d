/**
 * The measured hardware profile: the probe cache (hit, miss, expiry, a corrupt file, quick against
 * full), `hardwareFromProbe`'s mapping, plans on a measured profile against a preset's, the server's
 * profile of a probed GPU, the probing engine factory, and an engine that predates probe.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { probingFactory } from "../src/api/probe.ts";
import { WAN21_T2V_14B, WAN21_T2V_1_3B } from "../src/catalog/wan21.ts";
import type { EngineClient, ProbeOptions } from "../src/engine/client.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { SubprocessEngine } from "../src/engine/subprocess.ts";
import type { Logger } from "../src/log.ts";
import { DEFAULT_DISK_READ, GiB, H100_80GB, RTX4090_24GB } from "../src/planner/hardware.ts";
import { modelManifest } from "../src/planner/manifest.ts";
import { plan, type PlanRequest } from "../src/planner/plan.ts";
import { hardwareFromProbe, MeasuredProfiles, measuredProfiles, PROBE_MAX_AGE_MS, ProbeCache, probeCached, probeKey, rateAt, withMeasuredRates } from "../src/planner/probe-cache.ts";
import { ProbeResult, type DeviceInfo, type HelloResult } from "../src/protocol/engine.ts";
import { hardwareFor } from "../src/server/scheduler/admission.ts";
import { rejectsWith } from "./engine-conformance.ts";
import { probeLike } from "./fixtures/probe-result.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const H100_DEVICE: DeviceInfo = { index: 0, name: "NVIDIA Test GPU", totalBytes: 80 * GiB, freeBytes: 79 * GiB, capability: "9.0" };
const M13 = modelManifest("wan2.1-t2v-1.3b", WAN21_T2V_1_3B);
const M14 = modelManifest("wan2.1-t2v-14b", WAN21_T2V_14B);
const R480: PlanRequest = { width: 832, height: 480, frames: 81, steps: 50, guidance: 5 };

/** A FakeEngine that counts the probes it answers. */
class CountingEngine extends FakeEngine {
  probes = 0;
  override probe(options?: ProbeOptions): Promise<ProbeResult> {
    this.probes++;
    return super.probe(options);
  }
}

function recordingLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return { lines, debug: (m) => lines.push(`debug ${m}`), info: (m) => lines.push(`info ${m}`), warn: (m) => lines.push(`warn ${m}`) };
}

let dir: string;
before(() => {
  dir = tempDir("kino-probe-");
});
after(() => removeDir(dir));

describe("the probe cache", () => {
  let now = Date.parse("2025-06-01T00:00:00Z");
  const clock = () => now;

  test("a miss asks the engine and stores; a hit answers from the file without the engine", async () => {
    const engine = new CountingEngine({ devices: [H100_DEVICE] });
    const cache = new ProbeCache({ dir: `${dir}/hit`, now: clock });
    const hello = await engine.hello();
    const first = await probeCached(engine, hello, cache);
    assert.equal(first.cached, false);
    assert.equal(engine.probes, 1);
    assert.ok(existsSync(first.path) && first.path.startsWith(`${dir}/hit/nvidia-test-gpu-`), `one file per key, named for the GPU: ${first.path}`);
    now += 3600_000;
    const second = await probeCached(engine, hello, cache);
    assert.equal(second.cached, true);
    assert.equal(engine.probes, 1, "a cached measurement must not run the probe again");
    assert.deepEqual(second.result, first.result);
    assert.equal(second.probedAt, first.probedAt);
  });

  test("another driver, torch or host is another key (another file)", async () => {
    const hello = await new FakeEngine({ devices: [H100_DEVICE] }).hello();
    const cache = new ProbeCache({ dir: `${dir}/keys` });
    const base = probeKey({ ...hello, driver: "550.54.15" }, "node-a");
    assert.deepEqual(base, { gpu: "NVIDIA Test GPU", driver: "550.54.15", torch: "none", host: "node-a" });
    const paths = new Set([
      cache.pathFor(base),
      cache.pathFor({ ...base, driver: "560.28.03" }),
      cache.pathFor({ ...base, torch: "2.12.0" }),
      cache.pathFor({ ...base, host: "node-b" }),
    ]);
    assert.equal(paths.size, 4);
    await cache.write(base, probeLike(H100_80GB));
    assert.equal(await cache.read({ ...base, driver: "560.28.03" }), null, "a driver upgrade must not find the old measurement");
    assert.notEqual(await cache.read(base), null);
  });

  test("an entry older than the age limit (or from the future) is measured again", async () => {
    const engine = new CountingEngine({ devices: [H100_DEVICE] });
    let t = Date.parse("2025-06-01T00:00:00Z");
    const cache = new ProbeCache({ dir: `${dir}/expiry`, now: () => t, maxAgeMs: 7 * 24 * 3600_000 });
    const hello = await engine.hello();
    await probeCached(engine, hello, cache);
    t += 7 * 24 * 3600_000 - 1;
    assert.equal((await probeCached(engine, hello, cache)).cached, true, "within the limit it stands");
    t += 2;
    const stale = await probeCached(engine, hello, cache);
    assert.equal(stale.cached, false);
    assert.equal(engine.probes, 2);
    assert.equal(stale.probedAt, new Date(t).toISOString(), "the new measurement replaces the old one");
    t -= 24 * 3600_000;
    assert.equal(await cache.read(probeKey(hello)), null, "a measurement dated after now is not trusted");
    assert.equal(PROBE_MAX_AGE_MS, 30 * 24 * 3600_000);
  });

  for (const [what, content] of [
    ["not JSON", "{\"version\": 1, \"key\": "],
    ["JSON of another shape", JSON.stringify({ version: 1, key: { gpu: "x" }, probedAt: "yesterday", result: {} })],
    ["a result that breaks the schema", null],
  ] as const) {
    test(`a corrupt file (${what}) is a miss, logged, and replaced by the next measurement`, async () => {
      const engine = new CountingEngine({ devices: [H100_DEVICE] });
      const logger = recordingLogger();
      const cache = new ProbeCache({ dir: `${dir}/corrupt-${what.replace(/\W+/g, "-")}`, logger });
      const hello = await engine.hello();
      const good = await probeCached(engine, hello, cache);
      const text = content ?? readFileSync(good.path, "utf8").replace(/"h2dBytesPerS": [0-9.e+]+/, '"h2dBytesPerS": -1');
      writeFileSync(good.path, text);
      const again = await probeCached(engine, hello, cache);
      assert.equal(again.cached, false);
      assert.equal(engine.probes, 2);
      assert.ok(logger.lines.some((l) => l.startsWith("warn ignoring the probe cache")), `the corrupt file is named in a warning: ${logger.lines.join(" | ")}`);
      assert.equal((await probeCached(engine, hello, cache)).cached, true, "the file was rewritten whole");
    });
  }

  test("a quick measurement answers a quick ask only; a full one answers both; refresh measures again", async () => {
    const engine = new CountingEngine({ devices: [H100_DEVICE] });
    const cache = new ProbeCache({ dir: `${dir}/quick` });
    const hello = await engine.hello();
    assert.equal((await probeCached(engine, hello, cache, { quick: true })).result.quick, true);
    assert.equal((await probeCached(engine, hello, cache, { quick: true })).cached, true);
    const full = await probeCached(engine, hello, cache);
    assert.deepEqual([full.cached, full.result.quick], [false, false], "a quick measurement must not stand for a full one");
    assert.equal((await probeCached(engine, hello, cache, { quick: true })).result.quick, false, "the full one answers a quick ask");
    assert.equal((await probeCached(engine, hello, cache, { refresh: true })).cached, false);
    assert.equal(engine.probes, 3);
  });
});

describe("hardwareFromProbe", () => {
  test("maps every field; rates at the model's width, or the median", () => {
    const probed = probeLike(H100_80GB, {
      gemm: [probeLike(H100_80GB).gemm[0]!, probeLike(H100_80GB).gemm[1]!].map((g, i) => ({ ...g, flopsPerS: [500e12, 700e12][i]! })),
      attention: probeLike(H100_80GB).attention.map((a, i) => ({ ...a, flopsPerS: [400e12, 560e12][i]! })),
      h2dBytesPerS: 20e9,
      d2hBytesPerS: 18e9,
    });
    const hw = hardwareFromProbe(probed);
    assert.equal(hw.name, "NVIDIA Test GPU (measured)");
    assert.deepEqual([hw.vramTotal, hw.vramFree, hw.hostRam, hw.pinnedLimit], [probed.vramTotalBytes, probed.vramFreeBytes, probed.hostRamBytes, probed.pinnedLimitBytes]);
    assert.deepEqual([hw.h2d, hw.d2h, hw.cpuFlops], [20e9, 18e9, H100_80GB.cpuFlops]);
    assert.deepEqual([hw.gemmFlops, hw.attentionFlops], [600e12, 480e12], "without a width: the median of the shapes");
    const narrow = hardwareFromProbe(probed, { modelWidth: 1536 });
    assert.deepEqual([narrow.gemmFlops, narrow.attentionFlops], [500e12, 400e12], "the 1.3B (width 1536) takes the rates measured at its width");
    const wide = hardwareFromProbe(probed, { modelWidth: 5120 });
    assert.deepEqual([wide.gemmFlops, wide.attentionFlops], [700e12, 560e12], "12 heads × 128 = 1536, 40 × 128 = 5120");
    assert.ok(Object.isFrozen(hw));
  });

  test("rateAt: nearest width on a log scale, the wider on a tie; median of an odd count", () => {
    const m = [{ width: 1536, rate: 1 }, { width: 5120, rate: 2 }];
    assert.equal(rateAt(m, 3072), 2, "3072 is nearer 5120 than 1536 by ratio (1.67 against 2)");
    assert.equal(rateAt(m, 2048), 1);
    assert.equal(rateAt(m, Math.sqrt(1536 * 5120)), 2);
    assert.equal(rateAt([...m, { width: 4096, rate: 7 }]), 2);
  });

  test("a container's memory limit is the host RAM the planner gets", () => {
    const hw = hardwareFromProbe(probeLike(H100_80GB, { memoryLimitBytes: 64 * GiB, pinnedLimitBytes: 32 * GiB }));
    assert.equal(hw.hostRam, 64 * GiB);
    assert.equal(hw.pinnedLimit, 32 * GiB);
  });

  test("the disk's read rate: measured where the probe could, else the assumed rate; a plan reading from disk follows it", () => {
    assert.equal(hardwareFromProbe(probeLike(H100_80GB, { diskReadBytesPerS: 1.2e9 })).diskRead, 1.2e9);
    assert.equal(hardwareFromProbe(probeLike(H100_80GB, { diskReadBytesPerS: null })).diskRead, DEFAULT_DISK_READ, "a RAM-backed folder measures nothing");
    assert.equal(hardwareFromProbe(probeLike(H100_80GB)).diskRead, DEFAULT_DISK_READ, "an engine or a cached probe from before the field");
    const reported = { ...H100_80GB, diskRead: 4e9 };
    assert.equal(withMeasuredRates(reported, probeLike(H100_80GB, { diskReadBytesPerS: null })).diskRead, 4e9);
    assert.equal(withMeasuredRates(reported, probeLike(H100_80GB, { diskReadBytesPerS: 1e9 })).diskRead, 1e9);
    const short: PlanRequest = { width: 256, height: 256, frames: 5, steps: 8, guidance: 5 };
    const onDisk = (rate: number) => plan(M14, hardwareFromProbe(probeLike(RTX4090_24GB, { diskReadBytesPerS: rate }), { modelWidth: 5120 }), short, { ram: 8 * GiB });
    assert.ok(onDisk(1e9).predicted.secondsPerStep > 2 * onDisk(3e9).predicted.secondsPerStep, "a short clip read from disk is paced by the disk");
  });

  test("a measurement of the host alone is refused: DEVICE_UNAVAILABLE on --gpu", async () => {
    const cpu = await new FakeEngine().probe();
    assert.throws(() => hardwareFromProbe(cpu), (err: { code?: string; field?: string }) => err.code === "DEVICE_UNAVAILABLE" && err.field === "gpu");
  });
});

describe("plans on a measured profile", () => {
  test("a probe that measures what the preset says plans exactly as the preset", () => {
    for (const [m, hw] of [[M13, H100_80GB], [M14, RTX4090_24GB]] as const) {
      const probed = hardwareFromProbe(probeLike(hw), { modelWidth: m.transformer.shape.width });
      const a = plan(m, hw, R480);
      const b = plan(m, probed, R480);
      assert.deepEqual(b.placement, a.placement);
      assert.equal(b.predicted.seconds, a.predicted.seconds);
      assert.equal(b.hardware, "NVIDIA Test GPU (measured)");
    }
  });

  test("a slower host link makes streaming costlier where transfers outweigh compute (a short clip), not on a long one", () => {
    // The 14B under 24 GB on an H100 streams its transformer; the same card behind a 10 GB/s link.
    const budget = { vram: 24 * GiB };
    const slowLink = hardwareFromProbe(probeLike(H100_80GB, { h2dBytesPerS: 10e9, d2hBytesPerS: 10e9 }), { modelWidth: 5120 });
    const short: PlanRequest = { width: 256, height: 256, frames: 5, steps: 8, guidance: 5 };
    const preset = plan(M14, H100_80GB, short, budget);
    const slow = plan(M14, slowLink, short, budget);
    assert.equal(preset.placement.transformer.kind, "streamed", "the scenario must stream for the test to mean anything");
    assert.ok(slow.predicted.seconds > preset.predicted.seconds, `${slow.predicted.seconds.toFixed(1)} s must exceed ${preset.predicted.seconds.toFixed(1)} s`);
    const resident = (p: typeof preset) => (p.placement.transformer.kind === "streamed" ? p.placement.transformer.residentBlocks : M14.transformer.shape.layers);
    assert.ok(resident(slow) > resident(preset), `with copies dearer the planner keeps more blocks on the device (${resident(slow)} against ${resident(preset)})`);
    // 81 frames at 480p: a block's compute outweighs its copy even at 10 GB/s, so streaming stays free.
    const long = plan(M14, slowLink, R480, budget);
    assert.equal(long.placement.transformer.kind, "streamed");
    assert.equal(long.predicted.phases.denoise.seconds, plan(M14, H100_80GB, R480, budget).predicted.phases.denoise.seconds);
  });

  test("a faster GEMM makes the step faster", () => {
    const fast = plan(M13, hardwareFromProbe(probeLike(H100_80GB, { gemm: probeLike(H100_80GB).gemm.map((g) => ({ ...g, flopsPerS: 2 * g.flopsPerS })) })), R480);
    assert.ok(fast.predicted.secondsPerStep < plan(M13, H100_80GB, R480).predicted.secondsPerStep);
  });
});

describe("the server's profile of a GPU", () => {
  after(() => measuredProfiles.clear());

  test("hardwareFor keeps hello's memory and takes a probed GPU's rates and pinned cap", () => {
    measuredProfiles.clear();
    const before = hardwareFor(H100_DEVICE, 512 * GiB);
    assert.deepEqual([before.h2d, before.gemmFlops, before.pinnedLimit], [H100_80GB.h2d, H100_80GB.gemmFlops, 256 * GiB], "unprobed: the preset's rates");
    measuredProfiles.remember(probeLike(H100_80GB, { h2dBytesPerS: 12e9, pinnedLimitBytes: 100 * GiB }));
    const after = hardwareFor(H100_DEVICE, 512 * GiB);
    assert.deepEqual([after.h2d, after.pinnedLimit, after.vramFree, after.hostRam], [12e9, 100 * GiB, H100_DEVICE.freeBytes, 512 * GiB]);
    assert.equal(hardwareFor({ ...H100_DEVICE, name: "Another GPU" }, null).h2d, H100_80GB.h2d, "another GPU model keeps the preset");
  });

  test("MeasuredProfiles ignores a measurement of the host alone", async () => {
    const profiles = new MeasuredProfiles();
    profiles.remember(await new FakeEngine().probe());
    assert.equal(profiles.has("fake CPU"), false);
  });
});

describe("probingFactory", () => {
  test("engines of one GPU model starting together are probed once; later ones use what was measured", async () => {
    const engines: CountingEngine[] = [];
    const profiles = new MeasuredProfiles();
    const start = probingFactory(async () => {
      const e = new CountingEngine({ devices: [H100_DEVICE] });
      engines.push(e);
      return e;
    }, { cache: new ProbeCache({ dir: `${dir}/factory` }), logger: recordingLogger(), profiles });
    const started = await Promise.all([start(0), start(1)]);
    await start(2);
    assert.equal(engines.reduce((n, e) => n + e.probes, 0), 1);
    assert.equal(profiles.has(H100_DEVICE.name), true);
    for (const e of started) await e.close();
  });

  test("a CPU engine is not probed; one that cannot probe is handed out anyway, with a warning", async () => {
    const logger = recordingLogger();
    const profiles = new MeasuredProfiles();
    const cpu = new CountingEngine();
    const cache = new ProbeCache({ dir: `${dir}/factory-cpu` });
    assert.equal(await probingFactory(async () => cpu, { cache, logger, profiles })(null), cpu);
    assert.equal(cpu.probes, 0);
    const broken: EngineClient = new FakeEngine({ devices: [H100_DEVICE] });
    broken.probe = () => Promise.reject(new Error("CUDA out of memory"));
    assert.equal(await probingFactory(async () => broken, { cache, logger, profiles })(null), broken);
    assert.ok(logger.lines.some((l) => l.includes("warn could not measure") && l.includes("CUDA out of memory")), logger.lines.join(" | "));
    assert.equal(profiles.has(H100_DEVICE.name), false);
  });
});

test("an engine that predates probe answers ENGINE_TOO_OLD and keeps serving", async () => {
  const worker = fileURLToPath(new URL("./fixtures/stand-in-worker.js", import.meta.url));
  const engine = new SubprocessEngine({ command: { command: process.execPath, args: [worker, "ok"], env: {} } });
  try {
    const err = await rejectsWith(engine.probe(), "ENGINE_TOO_OLD");
    assert.match(err.message, /probe/);
    const hello: HelloResult = await engine.hello();
    assert.equal(hello.engineVersion, "stand-in", "the engine is still usable");
    assert.equal(hello.driver, undefined, "an older hello has no driver; the key takes null");
    assert.equal(probeKey(hello, "h").driver, null);
  } finally {
    await engine.close();
  }
});
