/**
 * The server under stress and after stops (FakeEngine): a restart with 50 queued jobs loses none;
 * jobs a dead process left running follow the recovery policy; 500 submissions at once get a
 * bounded queue, 429s and no loss; a second server cannot share a data folder.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { FakeEngine } from "../src/engine/fake.ts";
import type { KinoError } from "../src/errors.ts";
import { jobFile } from "../src/server/jobs/files.ts";
import { MAX_INTERRUPTIONS, recoveryAction } from "../src/server/jobs/recovery.ts";
import { SqliteJobStore } from "../src/server/jobs/sqlite-store.ts";
import type { JobSubmission } from "../src/server/jobs/store.ts";
import { parseSse, SMALL_JOB, startTestServer, submit, waitForStatus, withTestServer } from "./fixtures/server.ts";
import { removeDir } from "./fixtures/temp.ts";

test("a restart with 50 queued jobs loses none: all 50 run after it, in submission order", { timeout: 120_000 }, async () => {
  // The first server's engine is slow: one job is running when it shuts down, 49 wait.
  const first = await startTestServer({ engine: () => new FakeEngine({ stepMs: 2000 }) });
  const ids: string[] = [];
  try {
    for (let i = 0; i < 50; i++) {
      const res = await submit(first.server, { ...SMALL_JOB, seed: i });
      assert.equal(res.status, 202);
      ids.push(res.body.id);
    }
    await waitForStatus(first.server, ids[0]!, ["running"]);
  } finally {
    await first.server.close();
  }
  // What the first server left: all 50 queued (the running one was put back by the graceful shutdown).
  const store = SqliteJobStore.open(first.options.dataDir);
  const left = await store.withStatus("queued");
  await store.close();
  assert.deepEqual(left.map((j) => j.id), ids, "all 50 queued, in submission order");
  const second = await startTestServer({ home: first.home });
  try {
    const done = [];
    for (const id of ids) done.push(await waitForStatus(second.server, id, ["completed", "failed", "cancelled"], 60_000));
    assert.deepEqual(done.map((j) => j.status), ids.map(() => "completed"));
    const started = done.map((j) => Date.parse(j.startedAt!));
    assert.deepEqual(started, [...started].sort((a, b) => a - b), "they ran in the order they were submitted");
    for (const id of ids) assert.ok(existsSync(jobFile(first.options.dataDir, id, "video.mp4")), `job ${id} has its video`);
    const requeued = parseSse((await second.server.app.inject({ method: "GET", url: `/api/jobs/${ids[0]}/events` })).body);
    assert.ok(
      requeued.some((e) => e.event === "notice" && /requeued: the server shut down/.test(e.data.data.message)),
      "the job that was running says it was requeued",
    );
    assert.equal(done[0]!.attempts, 2, "it was started twice");
  } finally {
    await second.server.close();
    removeDir(first.home);
  }
});

const submission = (modelsDir: string): JobSubmission => ({
  model: { name: "tiny", path: join(modelsDir, "tiny"), randomWeights: false, tiny: true },
  params: { prompt: "p", negativePrompt: "", width: 64, height: 48, frames: 5, steps: 2, guidance: 5, shift: null, seed: 1, fps: null },
  dtype: null,
  keepAliveMs: null,
  previewEvery: 0,
});

test("jobs a dead server left running: requeued once, failed with INTERRUPTED the second time", async () => {
  assert.equal(MAX_INTERRUPTIONS, 1);
  assert.equal(recoveryAction({ interruptions: 0 }), "requeue");
  assert.equal(recoveryAction({ interruptions: 1 }), "fail");
  // Stored as a process that died mid-job would leave them: status running, no terminal event.
  const probe = await startTestServer();
  const { home, config } = probe;
  await probe.server.close();
  const store = SqliteJobStore.open(config.dataDir);
  const ids = ["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002", "00000000-0000-4000-8000-000000000003"];
  for (const id of ids) await store.create(id, submission(config.modelsDir), Date.now(), { type: "queued", position: 1 });
  await store.update(ids[0]!, { status: "running", attempts: 1 }, Date.now(), { type: "started", attempt: 1, engine: 0 });
  await store.update(ids[1]!, { status: "running", attempts: 2, interruptions: 1 }, Date.now(), { type: "started", attempt: 2, engine: 0 });
  await store.close();

  const t = await startTestServer({ home });
  try {
    const once = await waitForStatus(t.server, ids[0]!, ["completed", "failed"]);
    assert.equal(once.status, "completed", "interrupted once: requeued and run");
    const events = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${ids[0]}/events` })).body);
    assert.ok(events.some((e) => e.event === "notice" && /requeued: the server stopped while this job ran/.test(e.data.data.message)));
    const twice = await t.server.service.get(ids[1]!);
    assert.equal(twice.status, "failed");
    assert.equal(twice.error?.code, "INTERRUPTED");
    assert.match(twice.error!.message, /2 times; it is not retried again/);
    assert.equal((await waitForStatus(t.server, ids[2]!, ["completed"])).status, "completed", "a queued job is untouched and runs");
  } finally {
    await t.server.close();
    removeDir(home);
  }
});

test("500 submissions at once: a bounded queue, immediate 429s, no crash, every accepted job completes", { timeout: 120_000 }, async () => {
  const QUEUE = 20;
  // Jobs of about 100 ms: the burst (about 150 ms) ends long before the queue drains, so what is accepted is the bound.
  await withTestServer({ engine: () => new FakeEngine({ stepMs: 30 }), options: { queueSize: QUEUE } }, async (t) => {
    await t.server.scheduler.whenReady();
    const started = performance.now();
    const answers = await Promise.all(
      Array.from({ length: 500 }, (_, i) => t.server.app.inject({ method: "POST", url: "/api/jobs", payload: { ...SMALL_JOB, seed: i } })),
    );
    const elapsed = performance.now() - started;
    const accepted = answers.filter((a) => a.statusCode === 202).map((a) => a.json().id as string);
    const refused = answers.filter((a) => a.statusCode === 429);
    assert.equal(accepted.length + refused.length, 500, `only 202 and 429: ${[...new Set(answers.map((a) => a.statusCode))]}`);
    assert.ok(accepted.length >= QUEUE, `at least a queue's worth accepted (${accepted.length})`);
    assert.ok(refused.length > 0 && accepted.length <= QUEUE + 5, `the queue is bounded: ${accepted.length} accepted`);
    for (const r of refused) {
      assert.equal(r.json().error.code, "QUEUE_FULL");
      assert.match(r.json().error.message, /--queue-size/);
    }
    assert.ok(elapsed < 20_000, `429s are immediate, not waits (${Math.round(elapsed)} ms for 500)`);
    for (const id of accepted) assert.equal((await waitForStatus(t.server, id, ["completed", "failed", "cancelled"], 60_000)).status, "completed");
    const stored = (await t.server.app.inject({ method: "GET", url: "/api/jobs?limit=100" })).json();
    assert.deepEqual(new Set(stored.jobs.map((j: { id: string }) => j.id)), new Set(accepted), "the stored jobs are exactly the accepted ones");
    assert.equal((await t.server.app.inject({ method: "GET", url: "/api/health" })).json().status, "ok", "the server is still up and well");
    const after = await submit(t.server, SMALL_JOB);
    assert.equal(after.status, 202, "and takes jobs again once the queue drained");
  });
});

test("a second server on the same data folder is refused with DATA_DIR_IN_USE", async () => {
  await withTestServer({}, async (t) => {
    await assert.rejects(startTestServer({ home: t.home }), (e: KinoError) => e.code === "DATA_DIR_IN_USE" && /another kino serve/.test(e.message));
  });
});

test("graceful shutdown while a client follows a job: the stream ends, the job is queued, nothing is lost", async () => {
  const t = await startTestServer({ engine: () => new FakeEngine({ stepMs: 50 }) });
  const base = await t.server.listen();
  const { body } = await submit(t.server, { ...SMALL_JOB, steps: 200 });
  await waitForStatus(t.server, body.id, ["running"]);
  const stream = fetch(`${base}/api/jobs/${body.id}/events`).then((r) => r.text());
  await new Promise((r) => setTimeout(r, 200));
  await t.server.close();
  const events = parseSse(await stream);
  assert.equal(events.at(-1)?.event, "notice", "the last thing the client heard is the requeue");
  const store = SqliteJobStore.open(t.options.dataDir);
  try {
    assert.equal((await store.get(body.id))?.status, "queued");
    assert.equal(existsSync(join(t.options.dataDir, "jobs", body.id)), false, "no half-written output is kept");
  } finally {
    await store.close();
    removeDir(t.home);
  }
});
