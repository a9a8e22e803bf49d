/**
 * Several `kino serve` nodes on one Redis (`--queue redis://…`), against a real redis-server: the
 * Redis job store passes the JobStore conformance suite; two servers (FakeEngine) share the BullMQ
 * queue: jobs submitted to one run on either, either answers for any job and streams its events
 * live, a cancellation reaches the node that runs the job (and a waiting job leaves the queue), a
 * node shutting down gives its running job back to the other; bad and unreachable addresses are
 * refused; `bin/kino serve --queue` starts and stops on it.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Redis } from "ioredis";
import { REPO_ROOT } from "../src/config/config.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import type { RequestOptions } from "../src/engine/client.ts";
import type { KinoError } from "../src/errors.ts";
import type { GenerateResult, JobSpec } from "../src/protocol/engine.ts";
import type { StoredEvent } from "../src/server/jobs/store.ts";
import { connectRedis } from "../src/server/redis/connect.ts";
import { RedisJobStore } from "../src/server/redis/store.ts";
import { Job } from "../src/server/schemas.ts";
import { jobStoreConformance, storeId, SUBMISSION } from "./fixtures/job-store-conformance.ts";
import { freePort, startRedis, type TestRedis } from "./fixtures/redis.ts";
import { startListening } from "./fixtures/listening-process.ts";
import { readSse, startTestServer, waitForStatus, type TestServer } from "./fixtures/server.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

let redis: TestRedis;
before(async () => {
  redis = await startRedis();
});
after(async () => {
  await redis?.stop();
});

let prefixes = 0;
/** Each store (or cluster) gets keys of its own on the one redis-server. */
const freshPrefix = () => `t${process.pid}-${prefixes++}`;

jobStoreConformance("RedisJobStore", async () => new RedisJobStore(new Redis(redis.url), { prefix: freshPrefix() }));

describe("RedisJobStore across nodes", () => {
  test("events one node records reach the other node's watchers, in order, and not the writer's own", async () => {
    const prefix = freshPrefix();
    const a = new RedisJobStore(new Redis(redis.url), { prefix });
    const b = new RedisJobStore(new Redis(redis.url), { prefix });
    try {
      const seenByA: StoredEvent[] = [];
      const seenByB: StoredEvent[] = [];
      a.watchEvents((e) => seenByA.push(e));
      b.watchEvents((e) => seenByB.push(e));
      await new Promise((r) => setTimeout(r, 100));
      await a.create(storeId(1), SUBMISSION, 10, { type: "queued", position: 1 });
      await a.update(storeId(1), { status: "running" }, 11, { type: "started", attempt: 1, engine: 0 });
      await b.update(storeId(1), { cancelRequested: true }, 12, { type: "notice", message: "from b" });
      for (let i = 0; i < 100 && (seenByB.length < 2 || seenByA.length < 1); i++) await new Promise((r) => setTimeout(r, 10));
      assert.deepEqual(seenByB.map((e) => [e.seq, e.data.type, e.at]), [[1, "queued", 10], [2, "started", 11]]);
      assert.deepEqual(seenByA.map((e) => [e.seq, e.data.type]), [[3, "notice"]]);
      assert.equal((await b.get(storeId(1)))?.status, "running", "both see one job");
    } finally {
      await a.close();
      await b.close();
    }
  });
});

test("RedisJobStore: a job stored before previews existed (no previewEvery in its submission) reads back with none", async () => {
  const prefix = freshPrefix();
  const raw = new Redis(redis.url);
  const store = new RedisJobStore(new Redis(redis.url), { prefix });
  try {
    await store.create(storeId(1), { ...SUBMISSION, previewEvery: 4 }, 1, { type: "queued", position: 1 });
    const key = `${prefix}:job:${storeId(1)}`;
    const { previewEvery, ...old } = JSON.parse((await raw.hget(key, "submission"))!) as Record<string, unknown>;
    assert.equal(previewEvery, 4, "the field is stored");
    await raw.hset(key, "submission", JSON.stringify(old));
    assert.equal((await store.get(storeId(1)))?.submission.previewEvery, 0);
  } finally {
    raw.disconnect();
    await store.close();
  }
});

/** FakeEngine that counts the jobs it generates, to see which node ran what. */
class CountingEngine extends FakeEngine {
  static readonly counts = new Map<string, number>();
  readonly #node: string;

  constructor(node: string, stepMs: number) {
    super({ stepMs });
    this.#node = node;
  }

  override generate(job: JobSpec, options?: RequestOptions): Promise<GenerateResult> {
    CountingEngine.counts.set(this.#node, (CountingEngine.counts.get(this.#node) ?? 0) + 1);
    return super.generate(job, options);
  }
}

const JOB = { model: "tiny", prompt: "a harbour at night", size: "64x48", frames: 5, steps: 6, seed: 1 };

describe("two kino serve nodes sharing one Redis queue", { timeout: 120_000 }, () => {
  const data = tempDir("kino-cluster-data-");
  const nodes: Record<"a" | "b", TestServer> = {} as never;
  const urls: Record<"a" | "b", string> = {} as never;

  const startNode = async (name: "a" | "b", prefix: string) => {
    const shared = await connectRedis(redis.url, { logger: { debug() {}, info() {}, warn() {} }, prefix, lockMs: 5000 });
    // One data folder for both: in a cluster it holds only videos, and either node can then serve any of them.
    const t = await startTestServer({
      options: { dataDir: data, queue: redis.url },
      store: shared.store,
      sharedQueue: shared.queue,
      engine: async () => new CountingEngine(name, 15),
    });
    nodes[name] = t;
    urls[name] = await t.server.listen();
    return t;
  };
  const submit = async (node: "a" | "b", body: object) => {
    const res = await nodes[node].server.app.inject({ method: "POST", url: "/api/jobs", payload: body });
    assert.equal(res.statusCode, 202, res.body);
    return Job.parse(res.json());
  };

  before(async () => {
    const prefix = freshPrefix();
    await startNode("a", prefix);
    await startNode("b", prefix);
  });
  after(async () => {
    await Promise.all(Object.values(nodes).map((t) => t.server.close()));
    for (const t of Object.values(nodes)) removeDir(t.home);
    removeDir(data);
  });

  test("jobs submitted to one node run on both; either node answers for every job and serves its video", async () => {
    CountingEngine.counts.clear();
    const jobs = [];
    for (let i = 0; i < 6; i++) jobs.push(await submit("a", { ...JOB, seed: i }));
    for (const job of jobs) await waitForStatus(nodes.b.server, job.id, ["completed", "failed"], 60_000);
    for (const job of jobs) {
      const [fromA, fromB] = await Promise.all(["a", "b"].map(async (n) => Job.parse(await (await fetch(`${urls[n as "a"]}/api/jobs/${job.id}`)).json())));
      assert.equal(fromA!.status, "completed");
      assert.deepEqual(fromB, fromA, "both nodes answer the same for a job");
    }
    assert.ok((CountingEngine.counts.get("a") ?? 0) > 0 && (CountingEngine.counts.get("b") ?? 0) > 0, `both nodes ran jobs: ${JSON.stringify([...CountingEngine.counts])}`);
    assert.equal((CountingEngine.counts.get("a") ?? 0) + (CountingEngine.counts.get("b") ?? 0), 6, "each job ran once");
    const video = await fetch(`${urls.b}/api/jobs/${jobs[0]!.id}/video`);
    assert.equal(video.status, 200);
    const list = (await (await fetch(`${urls.b}/api/jobs?limit=6`)).json()) as { jobs: Job[] };
    assert.deepEqual(list.jobs.map((j) => j.id), jobs.map((j) => j.id).reverse(), "node b lists node a's submissions, newest first");
  });

  test("a job's events stream live from the node that did not take the submission", async () => {
    const job = await submit("a", { ...JOB, steps: 20 });
    const { events } = await readSse(`${urls.b}/api/jobs/${job.id}/events`);
    const types = events.map((e) => e.event);
    assert.equal(types.at(-1), "completed", types.join(", "));
    assert.deepEqual(events.map((e) => e.id), events.map((_, i) => i + 1), "every event once, in order");
    assert.equal(events.filter((e) => e.event === "progress" && e.data.data.step !== null).length, 20);
  });

  test("cancel through either node: a running job stops on the node that runs it; a waiting one leaves the queue", async () => {
    const long = { ...JOB, steps: 100_000 };
    const first = await submit("a", long);
    const second = await submit("a", long);
    await waitForStatus(nodes.a.server, first.id, ["running"], 20_000);
    await waitForStatus(nodes.a.server, second.id, ["running"], 20_000);
    // Both engines are busy: the third waits in the shared queue.
    const third = await submit("b", long);
    const waiting = await nodes.a.server.service.cancel(third.id);
    assert.equal(waiting.status, "cancelled", "a job still waiting is cancelled at once");
    for (const [via, job] of [["b", first], ["a", second]] as const) {
      const res = await nodes[via].server.app.inject({ method: "POST", url: `/api/jobs/${job.id}/cancel` });
      assert.equal(res.statusCode, 202, res.body);
      const done = await waitForStatus(nodes[via === "a" ? "b" : "a"].server, job.id, ["cancelled", "completed", "failed"], 20_000);
      assert.equal(done.status, "cancelled");
    }
    const after = await submit("b", JOB);
    assert.equal((await waitForStatus(nodes.a.server, after.id, ["completed", "failed"], 30_000)).status, "completed", "the engines are free again");
    assert.equal((await nodes.b.server.service.get(third.id)).status, "cancelled", "the waiting job never ran");
  });

  test("a node shutting down gives its running job back to the shared queue; the other node finishes it", async () => {
    CountingEngine.counts.clear();
    const job = await submit("b", { ...JOB, steps: 150 });
    // Running is recorded before the engine is asked: wait until one node's engine generates it.
    for (let i = 0; i < 2000 && CountingEngine.counts.size === 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal((await nodes.a.server.service.get(job.id)).status, "running");
    const holder = CountingEngine.counts.has("a") ? "a" : "b";
    const other = holder === "a" ? "b" : "a";
    await nodes[holder].server.close();
    const done = await waitForStatus(nodes[other].server, job.id, ["completed", "failed"], 30_000);
    assert.equal(done.status, "completed");
    assert.equal(done.attempts, 2, "started on one node, finished on the other");
    assert.equal(CountingEngine.counts.get(other), 1);
    const events = await nodes[other].server.service.events(job.id);
    assert.ok(events.some((e) => e.data.type === "notice" && /requeued: the server shut down/.test(e.data.message)));
  });
});

describe("a node that dies holding a job", { timeout: 90_000 }, () => {
  test("once its lock expires, another node recovers the job and runs it again (attempt 2, with a notice)", async () => {
    const prefix = freshPrefix();
    const home = tempDir("kino-dying-node-");
    let survivor: TestServer | undefined;
    try {
      const node = join(REPO_ROOT, "dist", "test", "fixtures", "cluster-node.js");
      const { child, url, exited } = await startListening(process.execPath, [node, redis.url, prefix, "1500", home], process.env, /listening (\S+)/);
      const res = await fetch(`${url}/api/jobs`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ...JOB, steps: 300 }) });
      const job = Job.parse(await res.json());
      await readSse(`${url}/api/jobs/${job.id}/events`, {}, (e) => (e.event === "progress" && e.data.data.step === 3 ? "stop" : undefined));
      child.kill("SIGKILL");
      await exited;

      const shared = await connectRedis(redis.url, { logger: { debug() {}, info() {}, warn() {} }, prefix, lockMs: 1500 });
      survivor = await startTestServer({ options: { queue: redis.url }, store: shared.store, sharedQueue: shared.queue, engine: async () => new FakeEngine({ stepMs: 1 }) });
      assert.equal((await survivor.server.service.get(job.id)).status, "running", "the store still says running: nobody told it otherwise");
      const done = await waitForStatus(survivor.server, job.id, ["completed", "failed"], 60_000);
      assert.equal(done.status, "completed", JSON.stringify(done.error));
      assert.equal(done.attempts, 2);
      const notices = (await survivor.server.service.events(job.id)).filter((e) => e.data.type === "notice").map((e) => (e.data as { message: string }).message);
      assert.ok(notices.some((m) => /requeued: the server stopped while this job ran/.test(m)), notices.join(" | "));
    } finally {
      await survivor?.server.close();
      if (survivor !== undefined) removeDir(survivor.home);
      removeDir(home);
    }
  });
});

describe("--queue addresses", () => {
  const logger = { debug() {}, info() {}, warn() {} };
  test("not a Redis address: INVALID_ARGUMENT naming queue; nobody listening: QUEUE_UNAVAILABLE naming the address", async () => {
    for (const bad of ["http://localhost:6379", "localhost:6379", "redis://"]) {
      await assert.rejects(connectRedis(bad, { logger }), (e: KinoError) => e.code === "INVALID_ARGUMENT" && e.field === "queue", bad);
    }
    const port = await freePort();
    await assert.rejects(
      connectRedis(`redis://:secret@127.0.0.1:${port}`, { logger, connectTimeoutMs: 1000 }),
      (e: KinoError) => e.code === "QUEUE_UNAVAILABLE" && e.message.includes(`127.0.0.1:${port}`) && !e.message.includes("secret"),
    );
  });

  test("bin/kino serve --queue: listens on the shared queue, answers, stops cleanly on SIGTERM", { timeout: 120_000 }, async () => {
    const home = tempDir("kino-serve-queue-");
    try {
      const serve = await startListening(
        join(REPO_ROOT, "bin", "kino"),
        ["serve", "--port", "0", "--queue", redis.url],
        { ...process.env, KINO_HOME: home, KINO_API_KEY: "" },
        /listening on (http:\/\/[\d.]+:\d+)/,
      );
      assert.match(serve.output(), new RegExp(`jobs shared through redis://127\\.0\\.0\\.1:${redis.port}`));
      const jobs = await fetch(`${serve.url}/api/jobs`);
      assert.equal(jobs.status, 200);
      serve.child.kill("SIGTERM");
      assert.equal(await serve.exited, 0, serve.output());
    } finally {
      removeDir(home);
    }
  });

  test("bin/kino serve --queue with a wrong address exits 2 naming --queue", async () => {
    const home = tempDir("kino-serve-badqueue-");
    try {
      const child = spawn(join(REPO_ROOT, "bin", "kino"), ["serve", "--port", "0", "--queue", "http://nowhere"], {
        env: { ...process.env, KINO_HOME: home },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stderr = "";
      child.stderr.setEncoding("utf8").on("data", (t: string) => (stderr += t));
      const code = await new Promise<number | null>((resolve) => child.once("close", resolve));
      assert.equal(code, 2, stderr);
      assert.match(stderr, /--queue/);
      assert.match(stderr, /must be a Redis address such as redis:\/\/host:6379/);
    } finally {
      removeDir(home);
    }
  });
});
