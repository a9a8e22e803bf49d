/**
 * Batching in the server, on FakeEngine: waiting jobs of one model and shape run as one batch on one
 * engine, each with its own events, video and outcome; a job of another shape keeps its place; a
 * batch holds --max-batch jobs at most; a job cancelled mid-batch ends alone; a batch that runs out of
 * device memory runs its jobs again alone; an engine that dies fails every job of its batch. And the
 * decisions (selectBatch, batchKeepAlive, batchRoom), table-tested.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { describe, test } from "node:test";
import type { BatchJobOptions, RequestOptions } from "../src/engine/client.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { KinoError } from "../src/errors.ts";
import { findCatalogModel } from "../src/catalog/models.ts";
import { GiB } from "../src/planner/hardware.ts";
import { modelManifest } from "../src/planner/manifest.ts";
import { activationBytes, DENOISE_OVERHEAD } from "../src/planner/plan.ts";
import type { DeviceInfo, GenerateResult, JobSpec } from "../src/protocol/engine.ts";
import { jobFolder } from "../src/server/jobs/files.ts";
import { batchRoom, planOn } from "../src/server/scheduler/admission.ts";
import { batchKeepAlive, selectBatch } from "../src/server/scheduler/policy.ts";
import { ProcessList, type Job } from "../src/server/schemas.ts";
import { ManualClock, parseSse, SMALL_JOB, submit, waitForStatus, withTestServer, type TestServer } from "./fixtures/server.ts";

/** A FakeEngine that records what it runs alone and as batches, holds its first job until released, and can fail one batch. */
class BatchingEngine extends FakeEngine {
  readonly singles: string[] = [];
  readonly batches: string[][] = [];
  /** Fails the next batch, every job with this error. */
  failBatch: KinoError | null = null;
  readonly #gate: Promise<void>;
  release!: () => void;

  constructor(options: { stepMs?: number } = {}) {
    super({ stepMs: options.stepMs ?? 2 });
    this.#gate = new Promise((resolve) => (this.release = resolve));
  }

  override async generate(job: JobSpec, options?: RequestOptions): Promise<GenerateResult> {
    this.singles.push(job.prompt);
    if (job.prompt === BLOCKER.prompt) await this.#gate;
    return super.generate(job, options);
  }

  override generateBatch(jobs: readonly BatchJobOptions[]): Promise<GenerateResult>[] {
    this.batches.push(jobs.map((j) => j.job.prompt));
    const failure = this.failBatch;
    this.failBatch = null;
    return failure === null ? super.generateBatch(jobs) : jobs.map(() => Promise.reject(failure));
  }
}

/** The job that keeps the engine busy while the others queue up behind it. */
const BLOCKER = { ...SMALL_JOB, prompt: "the blocker" };

/** Submits the blocker, then `jobs` while it runs; releases it; returns the jobs' ids in order. */
async function queueBehindBlocker(t: TestServer, engine: BatchingEngine, jobs: readonly object[]): Promise<string[]> {
  const blocker = await submit(t.server, BLOCKER);
  await waitForStatus(t.server, blocker.body.id, ["running"]);
  const ids: string[] = [];
  for (const job of jobs) {
    const res = await submit(t.server, job);
    assert.equal(res.status, 202, JSON.stringify(res.body));
    ids.push(res.body.id);
  }
  engine.release();
  assert.equal((await waitForStatus(t.server, blocker.body.id, ["completed", "failed"])).status, "completed");
  return ids;
}

/** A finished job's events (the stream of a running job would wait for its end). */
const eventsOf = async (t: TestServer, id: string) =>
  parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${id}/events` })).body).map((e) => e.data.data);

const finished = (t: TestServer, ids: readonly string[]): Promise<Job[]> =>
  Promise.all(ids.map((id) => waitForStatus(t.server, id, ["completed", "failed", "cancelled"])));

describe("the batch window: requests sent together to an idle engine", () => {
  test("with --batch-window they start as one batch; without it the first starts alone", async () => {
    for (const windowMs of [200, 0]) {
      let engine!: BatchingEngine;
      await withTestServer({ engine: () => (engine = new BatchingEngine()), options: { batchWindowMs: windowMs } }, async (t) => {
        await t.server.scheduler.whenReady();
        const ids = await Promise.all(["p", "q", "r"].map(async (prompt, k) => (await submit(t.server, { ...SMALL_JOB, prompt, seed: k })).body.id as string));
        const done = await finished(t, ids);
        assert.deepEqual(done.map((j) => j.status), ["completed", "completed", "completed"]);
        // Sent together, they reach the queue in no set order: compare who ran how, as sets.
        const sizes = [...engine.batches.map((b) => b.length), ...engine.singles.map(() => 1)].sort();
        const ran = [...engine.batches.flat(), ...engine.singles].sort();
        assert.deepEqual(ran, ["p", "q", "r"], "each job ran once");
        assert.deepEqual(sizes, windowMs > 0 ? [3] : [1, 2], `window ${windowMs} ms: ${JSON.stringify({ batches: engine.batches, singles: engine.singles })}`);
      });
    }
  });

  test("a lone job waits out the window, no longer; a full batch does not wait", async () => {
    const clock = new ManualClock();
    let engine!: BatchingEngine;
    await withTestServer({ clock, engine: () => (engine = new BatchingEngine()), options: { batchWindowMs: 1000, maxBatch: 2 } }, async (t) => {
      await t.server.scheduler.whenReady();
      const lone = (await submit(t.server, { ...SMALL_JOB, prompt: "lone" })).body.id as string;
      await new Promise((r) => setTimeout(r, 50));
      assert.equal((await t.server.app.inject({ method: "GET", url: `/api/jobs/${lone}` })).json().status, "queued", "it waits for company");
      clock.advance(999);
      await new Promise((r) => setTimeout(r, 20));
      assert.equal((await t.server.app.inject({ method: "GET", url: `/api/jobs/${lone}` })).json().status, "queued");
      clock.advance(1);
      assert.equal((await waitForStatus(t.server, lone, ["completed"])).status, "completed", "the window ended: it runs alone");
      assert.deepEqual(engine.singles, ["lone"]);
      const pair = await Promise.all(["a", "b"].map(async (prompt) => (await submit(t.server, { ...SMALL_JOB, prompt })).body.id as string));
      // --max-batch 2 reached: no waiting, although the clock does not move.
      assert.deepEqual((await finished(t, pair)).map((j) => j.status), ["completed", "completed"]);
      assert.deepEqual(engine.batches, [["a", "b"]]);
    });
  });
});

describe("batches on FakeEngine", () => {
  test("waiting jobs of one shape run as one batch, each with its own events, video and result; another shape keeps its place", async () => {
    let engine!: BatchingEngine;
    await withTestServer({ engine: () => (engine = new BatchingEngine()) }, async (t) => {
      const jobs = [
        { ...SMALL_JOB, prompt: "b" },
        { ...SMALL_JOB, prompt: "c", size: "80x48" },
        { ...SMALL_JOB, prompt: "d", seed: 8 },
        { ...SMALL_JOB, prompt: "e", seed: 9 },
      ];
      const [b, c, d, e] = await queueBehindBlocker(t, engine, jobs);
      const done = await finished(t, [b!, c!, d!, e!]);
      assert.deepEqual(done.map((j) => j.status), ["completed", "completed", "completed", "completed"]);
      assert.deepEqual(engine.batches, [["b", "d", "e"]], "b, d and e share a shape: one batch, in queue order");
      assert.deepEqual(engine.singles, [BLOCKER.prompt, "c"], "c, of another shape, ran alone after the batch");
      for (const job of [done[0]!, done[2]!, done[3]!]) {
        assert.equal(job.result?.batchSize, 3);
        assert.equal(job.artifacts.length, 1, `job ${job.params.prompt} has its own video`);
        assert.ok(existsSync(`${jobFolder(t.options.dataDir, job.id)}/video.mp4`));
        const events = await eventsOf(t, job.id);
        const notice = events.find((x) => x.type === "notice");
        assert.match(notice?.message ?? "", /runs in one batch with 2 other jobs of the same model and shape/);
        assert.deepEqual(events.filter((x) => x.type === "progress" && x.step !== null).map((x) => x.step), [1, 2, 3], "its own step events");
        assert.deepEqual(events.filter((x) => ["completed", "failed", "cancelled"].includes(x.type)).map((x) => x.type), ["completed"]);
      }
      assert.equal(done[1]!.result?.batchSize, 1);
    });
  });

  test("--max-batch bounds a batch; 1 runs every job alone", async () => {
    for (const [maxBatch, batches, singles] of [
      [2, [["b", "d"]], ["e"]],
      [1, [], ["b", "d", "e"]],
    ] as const) {
      let engine!: BatchingEngine;
      await withTestServer({ engine: () => (engine = new BatchingEngine()), options: { maxBatch } }, async (t) => {
        const ids = await queueBehindBlocker(t, engine, ["b", "d", "e"].map((prompt) => ({ ...SMALL_JOB, prompt })));
        assert.deepEqual((await finished(t, ids)).map((j) => j.status), ["completed", "completed", "completed"]);
        assert.deepEqual(engine.batches, batches, `--max-batch ${maxBatch}`);
        assert.deepEqual(engine.singles, [BLOCKER.prompt, ...singles], `--max-batch ${maxBatch}`);
      });
    }
  });

  test("a job cancelled mid-batch ends cancelled at once; the other completes; ps lists both while they run", async () => {
    let engine!: BatchingEngine;
    await withTestServer({ engine: () => (engine = new BatchingEngine({ stepMs: 10 })) }, async (t) => {
      const [b, d] = await queueBehindBlocker(t, engine, ["b", "d"].map((prompt) => ({ ...SMALL_JOB, prompt, steps: 60 })));
      // In the loop: d has had a step (a cancel before the batch starts would keep it out of the batch).
      const stepped = async () => (await t.server.store.events(d!, 0)).some((e) => e.data.type === "progress" && e.data.step !== null);
      for (let started = Date.now(); !(await stepped()); ) {
        assert.ok(Date.now() - started < 10_000, "d never reached its first step");
        await new Promise((r) => setTimeout(r, 5));
      }
      const ps = ProcessList.parse((await t.server.app.inject({ method: "GET", url: "/api/ps" })).json()).engines[0]!;
      assert.deepEqual([ps.jobId, ps.jobIds], [b, [b, d]], "the engine runs both jobs of the batch");
      const cancel = await t.server.app.inject({ method: "POST", url: `/api/jobs/${d}/cancel` });
      assert.equal(cancel.statusCode, 202);
      const cancelled = await waitForStatus(t.server, d!, ["completed", "failed", "cancelled"]);
      assert.equal(cancelled.status, "cancelled");
      assert.equal((await t.server.service.get(b!)).status, "running", "the other job is still running when the cancelled one has ended");
      const completed = await waitForStatus(t.server, b!, ["completed", "failed", "cancelled"]);
      assert.equal(completed.status, "completed");
      assert.equal(completed.result?.batchSize, 2);
      assert.equal(existsSync(jobFolder(t.options.dataDir, d!)), false, "nothing of the cancelled job is kept");
      assert.deepEqual(engine.batches, [["b", "d"]]);
    });
  });

  test("a batch that runs out of device memory runs each of its jobs again alone", async () => {
    let engine!: BatchingEngine;
    await withTestServer({ engine: () => (engine = new BatchingEngine()) }, async (t) => {
      engine.failBatch = new KinoError("OOM", "CUDA out of memory. Tried to allocate 2.00 GiB (fake)", { phase: "denoise" });
      const ids = await queueBehindBlocker(t, engine, ["b", "d"].map((prompt) => ({ ...SMALL_JOB, prompt })));
      const done = await finished(t, ids);
      assert.deepEqual(done.map((j) => [j.status, j.result?.batchSize]), [["completed", 1], ["completed", 1]]);
      assert.deepEqual([engine.batches, engine.singles], [[["b", "d"]], [BLOCKER.prompt, "b", "d"]], "the batch, then each job alone");
      for (const id of ids) {
        const notices = (await eventsOf(t, id)).filter((x) => x.type === "notice").map((x) => x.message);
        assert.ok(notices.some((m) => /out of device memory in a batch of 2 jobs; running it again alone/.test(m)), notices.join(" | "));
      }
    });
  });

  test("an engine that dies mid-batch fails every job of the batch with a clear error and is replaced", async () => {
    const engines: BatchingEngine[] = [];
    await withTestServer({ engine: () => engines[engines.push(new BatchingEngine()) - 1]! }, async (t) => {
      engines[0]!.failBatch = new KinoError("ENGINE_CRASHED", "the engine process was killed by SIGKILL during generate_batch");
      const ids = await queueBehindBlocker(t, engines[0]!, ["b", "d"].map((prompt) => ({ ...SMALL_JOB, prompt })));
      for (const job of await finished(t, ids)) {
        assert.equal(job.status, "failed");
        assert.equal(job.error?.code, "ENGINE_CRASHED");
        assert.match(job.error!.message, /the engine stopped while running this job .*a fresh engine serves the next one/);
      }
      const next = await submit(t.server, SMALL_JOB);
      assert.equal((await waitForStatus(t.server, next.body.id, ["completed", "failed"])).status, "completed");
      assert.equal(engines.length, 2, "the dead engine was replaced once, not once per job");
    });
  });
});

describe("the batching decisions", () => {
  test("selectBatch: the next job, then waiting jobs of its key in queue order, up to the limit", () => {
    const job = (id: string, batchKey: string) => ({ id, batchKey });
    const [a, b, c, d] = [job("a", "k"), job("b", "other"), job("c", "k"), job("d", "k")];
    const queue = [a, b, c, d];
    const ids = (limit: number) => selectBatch(a, queue, limit).map((j) => j.id);
    assert.deepEqual(ids(4), ["a", "c", "d"], "b has another shape: it keeps its place");
    assert.deepEqual(ids(2), ["a", "c"]);
    assert.deepEqual(ids(1), ["a"], "a limit of 1: no batching");
    assert.deepEqual(selectBatch(b, queue, 4).map((j) => j.id), ["b"], "alone of its shape");
  });

  test("batchKeepAlive: the longest asked for; any asking for ever keeps the model for ever", () => {
    assert.equal(batchKeepAlive([300_000, 0, 60_000]), 300_000);
    assert.equal(batchKeepAlive([0, 0]), 0);
    assert.equal(batchKeepAlive([5_000, -1]), -1);
  });

  test("batchRoom: as many jobs as the plan's denoise peak leaves room for, within the limit", () => {
    const gpu = (gib: number): DeviceInfo => ({ index: 0, name: `Fake GPU ${gib} GB`, totalBytes: gib * GiB, freeBytes: gib * GiB, capability: "9.0" });
    const params = (width: number, height: number) => ({ prompt: "p", negativePrompt: "", width, height, frames: 81, steps: 50, guidance: 5, shift: null, seed: 1, fps: null });
    const ram = 256 * GiB;
    assert.equal(batchRoom("wan2.1-t2v-1.3b", params(832, 480), gpu(80), ram, 4), 4, "1.3B at 480p on 80 GB: room for more than the limit");
    assert.equal(batchRoom("wan2.1-t2v-14b", params(1280, 720), gpu(12), ram, 4), 1, "14B at 720p on 12 GB: no room beside one job");
    assert.equal(batchRoom("wan2.1-t2v-14b", params(1280, 720), gpu(2), ram, 4), 1, "no plan at all: the job runs alone and says why");
    assert.equal(batchRoom("wan2.1-t2v-1.3b", params(832, 480), gpu(80), ram, 1), 1);
    assert.equal(batchRoom("tiny", params(64, 48), undefined, ram, 4), 4, "unplanned (CPU engine, tiny model): the limit");

    // Where the room is below the limit, it is exactly what fits: one job more would not.
    const model = findCatalogModel("wan2.1-t2v-14b")!;
    const plan = planOn(model.id, params(1280, 720), gpu(80), ram)!;
    const room = batchRoom(model.id, params(1280, 720), gpu(80), ram, 16);
    const perJob = activationBytes(modelManifest(model.id, model.architecture!), plan.tokens, plan.cfg === "batched" ? 2 : 1) - DENOISE_OVERHEAD;
    const peak = (jobs: number) => plan.predicted.phases.denoise.vram + (jobs - 1) * perJob;
    assert.ok(room > 1 && room < 16, `14B at 720p on 80 GB has room for a few jobs (${room})`);
    assert.ok(peak(room) <= plan.budget.usableVram && peak(room + 1) > plan.budget.usableVram, `${room} jobs fit, ${room + 1} would not`);
  });
});
