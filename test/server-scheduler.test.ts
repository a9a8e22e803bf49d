/**
 * The scheduler's behaviour on FakeEngine, with a manual clock where time matters: keep-alive and
 * unload, one engine per GPU, admission and execution through the planner, OOM retried once, engines
 * that fail to start (health, 503, backoff) or die while idle; and its pure decisions, table-tested.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { FakeEngine } from "../src/engine/fake.ts";
import type { RequestOptions } from "../src/engine/client.ts";
import { KinoError } from "../src/errors.ts";
import { GiB } from "../src/planner/hardware.ts";
import type { DeviceInfo, GenerateResult, JobSpec, LoadResult, ModelSpec } from "../src/protocol/engine.ts";
import { join } from "node:path";
import { learnedPeaks, PeakLog } from "../src/planner/learn.ts";
import { planOn } from "../src/server/scheduler/admission.ts";
import { batchKey, jobSpecFor } from "../src/server/scheduler/model-spec.ts";
import { decideOomRetry, isEngineFailure, pickSlot, restartBackoffMs, type SlotView } from "../src/server/scheduler/policy.ts";
import { Health, ProcessList } from "../src/server/schemas.ts";
import { parsePrewarm } from "../src/server/options.ts";
import { silentLogger } from "../src/log.ts";
import { ManualClock, parseSse, SMALL_JOB, submit, waitForStatus, withTestServer, type TestServer } from "./fixtures/server.ts";

/** Polls until `check` holds. */
async function eventually(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const ps = async (t: TestServer) => ProcessList.parse((await t.server.app.inject({ method: "GET", url: "/api/ps" })).json()).engines;
const health = async (t: TestServer) => {
  const res = await t.server.app.inject({ method: "GET", url: "/api/health" });
  return { status: res.statusCode, body: Health.parse(res.json()) };
};

const gpu = (index: number, gib: number): DeviceInfo => ({ index, name: `Fake GPU ${gib} GB`, totalBytes: gib * GiB, freeBytes: gib * GiB, capability: "9.0" });

/** A FakeEngine that records what it was asked to load and can run out of memory on demand. */
class ScriptedEngine extends FakeEngine {
  readonly loads: ModelSpec[] = [];
  readonly jobs: JobSpec[] = [];
  ooms: number;
  constructor(options: { devices?: DeviceInfo[]; stepMs?: number; ooms?: number } = {}) {
    super({ devices: options.devices, stepMs: options.stepMs ?? 2 });
    this.ooms = options.ooms ?? 0;
  }
  override async load(model: ModelSpec, options?: Omit<RequestOptions, "signal">): Promise<LoadResult> {
    this.loads.push(model);
    const result = await super.load(model, options);
    // What the real engine reports after executing a memory plan on a GPU.
    return model.device === "cuda" ? { ...result, memory: { pinnedBytes: 0, vramBudget: model.memory?.vramBudget ?? null, deviceWeightBytes: 3 * GiB } } : result;
  }
  override generate(job: JobSpec, options?: RequestOptions): Promise<GenerateResult> {
    this.jobs.push(job);
    if (this.ooms > 0) {
      this.ooms--;
      return Promise.reject(new KinoError("OOM", "CUDA out of memory. Tried to allocate 2.00 GiB (fake)", { phase: "denoise" }));
    }
    return super.generate(job, options);
  }
}

describe("keep-alive (manual clock)", () => {
  test("a model stays loaded for the keep-alive, then its engine is replaced by a fresh one", async () => {
    const clock = new ManualClock();
    let starts = 0;
    await withTestServer({ clock, engine: () => (starts++, new FakeEngine()) }, async (t) => {
      const { body } = await submit(t.server, SMALL_JOB);
      await waitForStatus(t.server, body.id, ["completed"]);
      await eventually(async () => (await ps(t))[0]!.state === "ready", "the engine is ready");
      const [engine] = await ps(t);
      assert.equal(engine!.model, "tiny");
      assert.equal(engine!.keepAliveExpiresAt, new Date(clock.now() + 300_000).toISOString(), "the default keep-alive, 5 min");
      clock.advance(299_999);
      assert.equal((await ps(t))[0]!.model, "tiny", "still loaded 1 ms before the end");
      clock.advance(1);
      await eventually(async () => (await ps(t))[0]!.state === "idle", "the model is unloaded");
      assert.equal(starts, 2, "unloading started a fresh engine (the protocol has no unload)");
      assert.equal((await ps(t))[0]!.restarts, 0, "an unload is not a failure");
      const next = await submit(t.server, SMALL_JOB);
      const events = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${(await waitForStatus(t.server, next.body.id, ["completed"])).id}/events` })).body);
      assert.ok(events.some((e) => e.event === "model.loading"), "the next job loads the model again");
    });
  });

  test("per-request keep-alive: 0 unloads right after the job, -1 keeps the model for good; a warm engine is not reloaded", async () => {
    const clock = new ManualClock();
    const engines: ScriptedEngine[] = [];
    await withTestServer({ clock, engine: () => engines[engines.push(new ScriptedEngine()) - 1]! }, async (t) => {
      const keep = await submit(t.server, { ...SMALL_JOB, keepAlive: -1 });
      await waitForStatus(t.server, keep.body.id, ["completed"]);
      await eventually(async () => (await ps(t))[0]!.state === "ready", "ready");
      assert.equal((await ps(t))[0]!.keepAliveExpiresAt, null);
      clock.advance(7 * 24 * 3_600_000);
      assert.equal((await ps(t))[0]!.model, "tiny", "kept after a week");
      const warm = await submit(t.server, { ...SMALL_JOB, keepAlive: "0" });
      await waitForStatus(t.server, warm.body.id, ["completed"]);
      assert.equal(engines[0]!.loads.length, 1, "the warm engine served the second job without a load");
      await eventually(async () => (await ps(t))[0]!.state === "idle" && engines.length === 2, "unloaded after keep-alive 0");
    });
  });
});

describe("engines and GPUs", () => {
  test("several GPUs: one engine pinned to each; jobs run side by side", async () => {
    const placements: Array<number | null> = [];
    const devices = [gpu(0, 24), gpu(1, 24)];
    await withTestServer({
      engine: (p) => {
        placements.push(p.gpu);
        // Pinned with CUDA_VISIBLE_DEVICES, an engine sees its one GPU as index 0.
        return new FakeEngine({ stepMs: 20, devices: p.gpu === null ? devices : [{ ...devices[p.gpu]!, index: 0 }] });
      },
    }, async (t) => {
      await t.server.scheduler.whenReady();
      assert.deepEqual(placements, [null, 0, 1], "a probe engine, then one per GPU");
      const a = await submit(t.server, { ...SMALL_JOB, steps: 30 });
      const b = await submit(t.server, { ...SMALL_JOB, steps: 30 });
      await eventually(async () => (await ps(t)).every((e) => e.state === "busy" || e.state === "loading"), "both engines work at once");
      const engines = await ps(t);
      assert.deepEqual(engines.map((e) => e.device?.kind), ["cuda", "cuda"]);
      assert.deepEqual(new Set(engines.map((e) => e.jobId)), new Set([a.body.id, b.body.id]));
      await waitForStatus(t.server, a.body.id, ["completed"]);
      await waitForStatus(t.server, b.body.id, ["completed"]);
    });
  });

  test("admission: a job that fits on no GPU is refused at once with 422 naming the smallest budget", async () => {
    // 4 GB: the 14B's 720p activations alone exceed it (at 8 GB the disk tier fits it, whatever the host's RAM).
    await withTestServer({ engine: () => new ScriptedEngine({ devices: [gpu(0, 4)] }) }, async (t) => {
      const res = await submit(t.server, { model: "wan2.1-t2v-14b", randomWeights: true, prompt: "p", size: "1280x720", frames: 81, steps: 2 });
      assert.equal(res.status, 422);
      assert.equal(res.body.error.code, "INFEASIBLE");
      assert.match(res.body.error.message, /does not fit on Fake GPU 4 GB, which has 4\.0 GiB free: the smallest plan needs a \d+\.\d GiB VRAM budget/);
      const need = Number(/needs a (\d+\.\d) GiB/.exec(res.body.error.message)![1]);
      assert.ok(need > 4, `the budget named is above the GPU's (${need} GiB)`);
      assert.deepEqual((await t.server.app.inject({ method: "GET", url: "/api/jobs" })).json().jobs, [], "nothing was queued");
    });
  });

  test("execution: the engine loads with the plan for its GPU, and an OOM is retried once with a safer plan", async () => {
    let engine!: ScriptedEngine;
    await withTestServer({ engine: () => (engine = new ScriptedEngine({ devices: [gpu(0, 24)], ooms: 1 })) }, async (t) => {
      const res = await submit(t.server, { model: "wan2.1-t2v-1.3b", randomWeights: true, prompt: "p", size: "832x480", frames: 17, steps: 2 });
      assert.equal(res.status, 202, JSON.stringify(res.body));
      const job = await waitForStatus(t.server, res.body.id, ["completed", "failed"]);
      assert.equal(job.status, "completed", JSON.stringify(job.error));
      const first = engine.loads[0]!;
      assert.equal(first.device, "cuda");
      assert.equal(first.memory?.vramBudget, 24 * GiB, "the plan's VRAM cap is the GPU's free memory");
      assert.equal(engine.jobs.length, 2, "one OOM, one retry");
      const [status] = await ps(t);
      assert.deepEqual([status!.vramBytes, status!.lastJobPeakVramBytes], [3 * GiB, 0], "ps: the weights' device bytes and the last job's peak");
      assert.ok(engine.jobs[0]!.vaeDecode !== undefined, "the plan's decode mode travels with the job");
      const events = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/events` })).body);
      const notice = events.find((e) => e.event === "notice")!;
      assert.match(notice.data.data.message, /out of device memory; retrying once with a safer plan \(25%/);
    });
  });

  test("learning: a job's measured peaks go to the peak log and correct the next plans for that model and GPU", async () => {
    const jobs: JobSpec[] = [];
    class PeakyEngine extends ScriptedEngine {
      override async generate(job: JobSpec, options?: RequestOptions): Promise<GenerateResult> {
        jobs.push(job);
        // The denoise phase peaked at 1.5x what any plan for this job predicts (the planner under-counted).
        return { ...(await super.generate(job, options)), phasePeakVramBytes: { textEncode: 12 * GiB, denoise: 20 * GiB, decode: 14 * GiB } };
      }
    }
    await withTestServer({ engine: () => new PeakyEngine({ devices: [gpu(0, 24)] }) }, async (t) => {
      const params = { prompt: "p", negativePrompt: "", width: 832, height: 480, frames: 17, steps: 2, guidance: 5, shift: null, seed: 1, fps: null };
      const before = planOn("wan2.1-t2v-1.3b", params, gpu(0, 24), null);
      assert.deepEqual(learnedPeaks.correctionsFor("wan2.1-t2v-1.3b", "Fake GPU 24 GB"), {}, "a fresh home has learned nothing");
      const res = await submit(t.server, { model: "wan2.1-t2v-1.3b", randomWeights: true, prompt: "p", size: "832x480", frames: 17, steps: 2 });
      const job = await waitForStatus(t.server, res.body.id, ["completed", "failed"]);
      assert.equal(job.status, "completed", JSON.stringify(job.error));
      const log = await new PeakLog(join(t.home, "planner", "peaks.jsonl")).read();
      assert.deepEqual(log.map((r) => r.phase).sort(), ["decode", "denoise", "textEncode"], "one record per phase, in kino's home");
      assert.ok(log.every((r) => r.model === "wan2.1-t2v-1.3b" && r.hardware === "Fake GPU 24 GB"));
      const learned = learnedPeaks.correctionsFor("wan2.1-t2v-1.3b", "Fake GPU 24 GB");
      assert.ok((learned.denoise ?? 1) > 1, `the denoise correction rises: ${JSON.stringify(learned)}`);
      const after = planOn("wan2.1-t2v-1.3b", params, gpu(0, 24), null);
      assert.ok(after!.predicted.phases.denoise.vram > before!.predicted.phases.denoise.vram, "the next plan predicts the larger peak");
      assert.deepEqual(after!.corrections, learned, "admission and runs plan with the learned corrections");
    });
  });

  test("ps: the running job's device memory at its last step, from the engine's step events; null once idle", async () => {
    let proceed!: () => void;
    const gate = new Promise<void>((resolve) => (proceed = resolve));
    class SteppingEngine extends ScriptedEngine {
      override async generate(job: JobSpec, options?: RequestOptions): Promise<GenerateResult> {
        options?.onEvent?.({ kind: "step", i: 1, n: job.steps, ms: 5, vramBytes: 7 * GiB, ramBytes: GiB });
        await gate;
        return super.generate(job, options);
      }
    }
    await withTestServer({ engine: () => new SteppingEngine({ devices: [gpu(0, 24)] }) }, async (t) => {
      const res = await submit(t.server, { model: "wan2.1-t2v-1.3b", randomWeights: true, prompt: "p", size: "832x480", frames: 17, steps: 2 });
      assert.equal(res.status, 202, JSON.stringify(res.body));
      await eventually(async () => (await ps(t))[0]!.vramInUseBytes === 7 * GiB, "ps shows the step's device memory while the job runs");
      proceed();
      await waitForStatus(t.server, res.body.id, ["completed"]);
      await eventually(async () => (await ps(t))[0]!.state === "ready", "ready");
      assert.equal((await ps(t))[0]!.vramInUseBytes, null, "idle: no live use");
    });
  });

  test("an OOM that comes back fails the job with OOM after one retry; the engine serves the next job", async () => {
    let engine!: ScriptedEngine;
    await withTestServer({ engine: () => (engine = new ScriptedEngine({ ooms: 2 })) }, async (t) => {
      const res = await submit(t.server, SMALL_JOB);
      const job = await waitForStatus(t.server, res.body.id, ["completed", "failed"]);
      assert.equal(job.status, "failed");
      assert.equal(job.error?.code, "OOM");
      assert.match(job.error!.message, /CUDA out of memory/);
      assert.equal(engine.jobs.length, 2);
      const next = await submit(t.server, SMALL_JOB);
      assert.equal((await waitForStatus(t.server, next.body.id, ["completed", "failed"])).status, "completed");
    });
  });

  test("an engine that cannot start: health 503 with the reason, jobs refused 503; it is retried with backoff and recovers", async () => {
    const clock = new ManualClock();
    let broken = true;
    await withTestServer({
      clock,
      engine: () => {
        if (broken) throw new KinoError("ENGINE_UNAVAILABLE", "no Python environment at /nowhere/python");
        return new FakeEngine();
      },
    }, async (t) => {
      await t.server.scheduler.whenReady();
      const down = await health(t);
      assert.equal(down.status, 503);
      assert.equal(down.body.status, "unavailable");
      assert.match(down.body.engines[0]!.error ?? "", /ENGINE_UNAVAILABLE: no Python environment/);
      const refused = await submit(t.server, SMALL_JOB);
      assert.equal(refused.status, 503);
      assert.equal(refused.body.error.code, "NO_ENGINE");
      assert.match(refused.body.error.message, /no Python environment/);
      broken = false;
      clock.advance(restartBackoffMs(1));
      await eventually(async () => (await health(t)).body.status === "ok", "the engine started on the retry");
      const ok = await submit(t.server, SMALL_JOB);
      assert.equal((await waitForStatus(t.server, ok.body.id, ["completed"])).status, "completed");
    });
  });

  test("one GPU's engine failing leaves the server degraded, and jobs run on the other", async () => {
    const devices = [gpu(0, 24), gpu(1, 24)];
    await withTestServer({
      engine: (p) => {
        if (p.gpu === 1) throw new KinoError("ENGINE_UNAVAILABLE", "GPU 1 is broken");
        return new FakeEngine({ devices: p.gpu === null ? devices : [{ ...devices[p.gpu]!, index: 0 }] });
      },
    }, async (t) => {
      await t.server.scheduler.whenReady();
      const h = await health(t);
      assert.equal(h.status, 200);
      assert.equal(h.body.status, "degraded");
      assert.deepEqual(h.body.engines.map((e) => e.state), ["idle", "failed"]);
      const res = await submit(t.server, SMALL_JOB);
      assert.equal((await waitForStatus(t.server, res.body.id, ["completed"])).status, "completed");
    });
  });

  test("an engine that died while idle is noticed (health, or the next job) and replaced; the job does not fail for it", async () => {
    const engines: FakeEngine[] = [];
    await withTestServer({ engine: () => engines[engines.push(new FakeEngine()) - 1]! }, async (t) => {
      const first = await submit(t.server, SMALL_JOB);
      await waitForStatus(t.server, first.body.id, ["completed"]);
      await engines[0]!.close(); // dies while idle
      const next = await submit(t.server, SMALL_JOB);
      assert.equal((await waitForStatus(t.server, next.body.id, ["completed", "failed"])).status, "completed");
      assert.equal(engines.length, 2);
      assert.equal((await ps(t))[0]!.restarts, 1);
      await engines[1]!.close();
      await health(t);
      await eventually(() => engines.length === 3, "health noticed the dead engine and started another");
    });
  });
});

describe("the scheduler's decisions", () => {
  const slot = (index: number, free: boolean, loaded: string | null, expiresAt: number | null = null): SlotView => ({ index, free, loaded, expiresAt });

  test("pickSlot: the engine with the model, else an empty one, else the one unloading soonest; none when all are busy", () => {
    const table: Array<[string, SlotView[], number | null]> = [
      ["warm beats empty", [slot(0, true, null), slot(1, true, "A")], 1],
      ["empty beats evicting", [slot(0, true, "B", 100), slot(1, true, null)], 1],
      ["evict the one that expires first", [slot(0, true, "B", 500), slot(1, true, "C", 100)], 1],
      ["a kept-for-good model is evicted last", [slot(0, true, "B", null), slot(1, true, "C", 10_000)], 1],
      ["busy engines are not candidates, even warm", [slot(0, false, "A"), slot(1, true, "B", 5)], 1],
      ["all busy", [slot(0, false, "A"), slot(1, false, null)], null],
      ["no engines", [], null],
    ];
    for (const [name, slots, expected] of table) assert.equal(pickSlot(slots, "A"), expected, name);
  });

  test("decideOomRetry: once, with a safer plan when planned", () => {
    assert.deepEqual([decideOomRetry(0, true).retry, decideOomRetry(0, false).retry, decideOomRetry(1, true).retry], [true, true, false]);
    assert.match(decideOomRetry(0, true).reason, /safer plan/);
    assert.doesNotMatch(decideOomRetry(0, false).reason, /plan/);
    assert.ok(decideOomRetry(0, true).margin > 0.1, "a larger margin than the planner's default");
  });

  test("engine failures, backoff, the batch key and the job spec's previews", () => {
    for (const code of ["ENGINE_CRASHED", "ENGINE_STALLED", "ENGINE_CLOSED", "ENGINE_UNAVAILABLE"] as const) assert.ok(isEngineFailure(code), code);
    for (const code of ["OOM", "CANCELLED", "BAD_CHECKPOINT", "INTERNAL"] as const) assert.ok(!isEngineFailure(code), code);
    assert.deepEqual([1, 2, 3, 7, 20].map(restartBackoffMs), [1000, 2000, 4000, 60_000, 60_000]);
    const sub = { model: { name: "tiny", path: "/m", randomWeights: false, tiny: true }, params: { ...SMALL_JOB_PARAMS }, dtype: null, keepAliveMs: null, previewEvery: 1 };
    assert.equal(batchKey(sub), batchKey({ ...sub, params: { ...sub.params, prompt: "another", seed: 9 } }), "prompt and seed do not change the shape");
    assert.equal(batchKey(sub), batchKey({ ...sub, previewEvery: 0 }), "previews do not either: the engine takes them per job of a batch");
    assert.notEqual(batchKey(sub), batchKey({ ...sub, params: { ...sub.params, width: 128 } }));
    assert.deepEqual(jobSpecFor({ ...sub, previewEvery: 3 }, "/v.mp4", null).preview, { every: 3 }, "the engine is asked for the job's previews");
    assert.equal("preview" in jobSpecFor({ ...sub, previewEvery: 0 }, "/v.mp4", null), false, "previewEvery 0: the engine is asked for none");
  });
});

const SMALL_JOB_PARAMS = { prompt: "p", negativePrompt: "", width: 64, height: 48, frames: 5, steps: 3, guidance: 5, shift: null, seed: 1, fps: null };

describe("kino serve --prewarm and --compile", () => {
  test("a prewarmed model is loaded as its shape's jobs need it, warmed per batch size when compiling, and a job of that shape does not load again", async () => {
    const engines: ScriptedEngine[] = [];
    await withTestServer(
      {
        engine: () => engines[engines.push(new ScriptedEngine()) - 1]!,
        options: { compile: true, maxBatch: 3, prewarm: [{ model: "tiny", size: "64x48", frames: 5 }] },
      },
      async (t) => {
        await eventually(() => engines[0] !== undefined && engines[0].prewarmed.length === 3, "three prewarm forwards");
        const engine = engines[0]!;
        assert.deepEqual(engine.prewarmed.map((p) => p.jobs), [1, 2, 3], "one forward per batch size up to --max-batch (compiled: each size compiles on its own)");
        assert.deepEqual([engine.prewarmed[0]!.job.width, engine.prewarmed[0]!.job.height, engine.prewarmed[0]!.job.frames], [64, 48, 5]);
        assert.equal(engine.loads.length, 1);
        assert.equal(engine.loads[0]!.runtime?.compile, true, "--compile reaches the engine's model spec");
        await eventually(async () => (await ps(t))[0]!.state === "ready", "the engine is ready with the model loaded");
        assert.equal((await ps(t))[0]!.keepAliveExpiresAt, null, "a prewarmed model stays until a job's keep-alive says otherwise");
        const { body } = await submit(t.server, { ...SMALL_JOB, steps: 2 });
        await waitForStatus(t.server, body.id, ["completed"]);
        const events = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${body.id}/events` })).body);
        assert.ok(!events.some((e) => e.event === "model.loading"), "the job found its model loaded by the prewarm");
        assert.equal(engine.loads.length, 1, "no second load");
      },
    );
  });

  test("without --compile one forward at batch 1; a target the model refuses is skipped and the server serves on", async () => {
    const engines: ScriptedEngine[] = [];
    const warnings: string[] = [];
    const logger = { ...silentLogger, warn: (m: string) => warnings.push(m) };
    await withTestServer(
      {
        engine: () => engines[engines.push(new ScriptedEngine()) - 1]!,
        logger,
        options: { prewarm: [{ model: "tiny", size: "65x48", frames: 5 }, { model: "tiny" }] },
      },
      async (t) => {
        await eventually(() => engines[0] !== undefined && engines[0].prewarmed.length === 1, "one prewarm forward");
        assert.deepEqual(engines[0]!.prewarmed.map((p) => p.jobs), [1]);
        assert.equal(engines[0]!.loads[0]!.runtime?.compile, false);
        assert.ok(warnings.some((w) => /prewarm of tiny 65x48x5 skipped: .*multiple.*\(size\)/.test(w)), warnings.join("\n"));
        const { body } = await submit(t.server, SMALL_JOB);
        assert.equal((await waitForStatus(t.server, body.id, ["completed"])).status, "completed");
      },
    );
  });

  test("a random-weights target warms what random-weight jobs of that shape run on", async () => {
    const engines: ScriptedEngine[] = [];
    await withTestServer(
      { engine: () => engines[engines.push(new ScriptedEngine()) - 1]!, options: { prewarm: [{ model: "wan2.1-t2v-1.3b", size: "64x48", frames: 5, randomWeights: true }] } },
      async (t) => {
        await eventually(() => engines[0] !== undefined && engines[0].prewarmed.length === 1, "the prewarm forward");
        assert.equal(engines[0]!.loads[0]!.source.kind, "random");
        const { body } = await submit(t.server, { model: "wan2.1-t2v-1.3b", randomWeights: true, prompt: "a fox", size: "64x48", frames: 5, steps: 2 });
        await waitForStatus(t.server, body.id, ["completed"]);
        const events = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${body.id}/events` })).body);
        assert.ok(!events.some((e) => e.event === "model.loading"), "the random-weight job found the prewarmed model");
        assert.equal(engines[0]!.loads.length, 1);
      },
    );
  });

  test("--prewarm parsing names the flag", () => {
    assert.deepEqual(parsePrewarm("wan2.1-t2v-1.3b:832x480x81, tiny, wan2.1-t2v-14b:1280x720x81:random, wan2.1-t2v-1.3b:random"), [
      { model: "wan2.1-t2v-1.3b", size: "832x480", frames: 81 },
      { model: "tiny" },
      { model: "wan2.1-t2v-14b", size: "1280x720", frames: 81, randomWeights: true },
      { model: "wan2.1-t2v-1.3b", randomWeights: true },
    ]);
    for (const bad of ["", "tiny:832x480", "tiny:832x480x", "../x", "tiny,", "tiny:random:64x48x5", "tiny:randomly"]) {
      assert.throws(() => parsePrewarm(bad), (e: KinoError) => e.code === "INVALID_ARGUMENT" && e.field === "prewarm", bad);
    }
  });
});
