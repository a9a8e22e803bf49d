/**
 * The native API on FakeEngine, in-process: a job from submission to its video, the SSE stream
 * (order, ids, exactly one terminal event, resuming with Last-Event-ID), Range requests, listing
 * with cursors, cancellation, models/ps/health, and the OpenAPI document generated from the schemas.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { z } from "zod";
import { FakeEngine } from "../src/engine/fake.ts";
import { Health, Job, JobList, JobRequest, ProcessList } from "../src/server/schemas.ts";
import { parseSse, readSse, SMALL_JOB, startTestServer, submit, waitForStatus, type TestServer } from "./fixtures/server.ts";
import { removeDir } from "./fixtures/temp.ts";

describe("a job through the native API (FakeEngine)", () => {
  let t: TestServer;
  let job: z.infer<typeof Job>;
  before(async () => {
    t = await startTestServer();
    const res = await submit(t.server, SMALL_JOB);
    assert.equal(res.status, 202, JSON.stringify(res.body));
    job = Job.parse(res.body);
    await waitForStatus(t.server, job.id, ["completed", "failed"]);
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test("POST /api/jobs answers 202 with the job, its Location and the model's defaults filled in", async () => {
    const res = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: { model: "tiny", prompt: "defaults", seed: 1 } });
    assert.equal(res.statusCode, 202);
    const body = Job.parse(res.json());
    assert.equal(res.headers.location, `/api/jobs/${body.id}`);
    assert.deepEqual([body.params.width, body.params.height, body.params.frames, body.params.steps], [320, 192, 17, 10]);
    assert.equal(body.noise, true, "the tiny model's video is noise, and the job says so");
    assert.equal(job.params.seed, 7);
    await waitForStatus(t.server, body.id, ["completed"]);
  });

  test("the event stream: queued, started, model.loading, progress, output, then one completed; ids 1..n", async () => {
    const res = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/events` });
    assert.equal(res.statusCode, 200);
    assert.match(String(res.headers["content-type"]), /^text\/event-stream/);
    const events = parseSse(res.body);
    assert.deepEqual(events.map((e) => e.id), events.map((_, i) => i + 1), "ids count up from 1 with no gap");
    assert.match(events[2]!.data.data.message ?? "", /making kino's tiny model/, "the first job makes the tiny model and says so");
    const types = events.map((e) => e.event).filter((t) => t !== "notice");
    assert.deepEqual(types.slice(0, 3), ["queued", "started", "model.loading"]);
    assert.deepEqual(types.slice(-2), ["output", "completed"]);
    assert.equal(types.filter((t) => ["completed", "failed", "cancelled"].includes(t)).length, 1, "exactly one terminal event");
    const steps = events.filter((e) => e.event === "progress" && e.data.data.phase === "denoise" && e.data.data.step !== null).map((e) => e.data.data);
    assert.deepEqual(steps.map((s) => s.step), [1, 2, 3]);
    assert.ok(steps.every((s) => s.total === 3 && s.s_per_step > 0 && s.eta >= 0), JSON.stringify(steps));
    assert.equal(steps.at(-1)!.eta, 0);
    assert.deepEqual(new Set(events.filter((e) => e.event === "progress").map((e) => e.data.data.phase)), new Set(["text_encode", "denoise", "decode", "encode"]));
    const output = events.find((e) => e.event === "output")!.data.data;
    assert.equal(output.artifact.url, `/api/jobs/${job.id}/video`);
    assert.equal(events.at(-1)!.data.jobId, job.id);
  });

  test("Last-Event-ID resumes after that event: only the later ones, ending with the terminal one", async () => {
    const all = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/events` })).body);
    const res = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/events`, headers: { "last-event-id": "4" } });
    const resumed = parseSse(res.body);
    assert.deepEqual(resumed.map((e) => e.id), all.filter((e) => e.id > 4).map((e) => e.id));
    const viaQuery = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/events?after=4` })).body);
    assert.deepEqual(viaQuery.map((e) => e.id), resumed.map((e) => e.id));
    const done = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/events`, headers: { "last-event-id": String(all.at(-1)!.id) } });
    assert.equal(done.statusCode, 200);
    assert.deepEqual(parseSse(done.body), [], "resumed after the terminal event: the stream ends at once, empty");
  });

  test("the video: whole (200), a range (206), a suffix range, and a range past the end (416, JSON)", async () => {
    const whole = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/video` });
    assert.equal(whole.statusCode, 200);
    assert.equal(whole.headers["content-type"], "video/mp4");
    assert.equal(whole.headers["accept-ranges"], "bytes");
    const bytes = whole.rawPayload;
    assert.equal(Number(whole.headers["content-length"]), bytes.length);
    assert.equal(bytes.subarray(4, 8).toString("latin1"), "ftyp", "an MP4 file");
    const done = Job.parse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}` })).json());
    assert.equal(done.artifacts[0]!.bytes, bytes.length);

    const head = await t.server.app.inject({ method: "HEAD", url: `/api/jobs/${job.id}/video` });
    assert.equal(head.statusCode, 200);
    assert.equal(Number(head.headers["content-length"]), bytes.length);
    assert.equal(head.rawPayload.length, 0, "HEAD sends the headers only");

    const part = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/video`, headers: { range: "bytes=10-109" } });
    assert.equal(part.statusCode, 206);
    assert.equal(part.headers["content-range"], `bytes 10-109/${bytes.length}`);
    assert.deepEqual(part.rawPayload, bytes.subarray(10, 110));

    const suffix = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/video`, headers: { range: "bytes=-16" } });
    assert.equal(suffix.statusCode, 206);
    assert.deepEqual(suffix.rawPayload, bytes.subarray(bytes.length - 16));

    const past = await t.server.app.inject({ method: "GET", url: `/api/jobs/${job.id}/video`, headers: { range: `bytes=${bytes.length + 10}-` } });
    assert.equal(past.statusCode, 416);
    assert.equal(past.headers["content-range"], `bytes */${bytes.length}`);
    assert.equal(past.json().error.code, "RANGE_NOT_SATISFIABLE");
    assert.equal(past.json().error.field, "Range");
  });

  test("GET /api/jobs lists newest first, filters by status, and pages with a cursor", async () => {
    for (let i = 0; i < 3; i++) {
      const r = await submit(t.server, { ...SMALL_JOB, seed: 100 + i });
      await waitForStatus(t.server, r.body.id, ["completed"]);
    }
    const all = JobList.parse((await t.server.app.inject({ method: "GET", url: "/api/jobs?limit=100" })).json());
    assert.ok(all.jobs.length >= 5);
    const created = all.jobs.map((j) => Date.parse(j.createdAt));
    assert.deepEqual(created, [...created].sort((a, b) => b - a), "newest first");
    const pages: string[] = [];
    let cursor: string | null = null;
    do {
      const url: string = `/api/jobs?limit=2${cursor === null ? "" : `&cursor=${cursor}`}`;
      const page = JobList.parse((await t.server.app.inject({ method: "GET", url })).json());
      assert.ok(page.jobs.length <= 2);
      pages.push(...page.jobs.map((j) => j.id));
      cursor = page.nextCursor;
    } while (cursor !== null);
    assert.deepEqual(pages, all.jobs.map((j) => j.id), "the pages together are the whole list, in order, without repeats");
    const completed = JobList.parse((await t.server.app.inject({ method: "GET", url: "/api/jobs?status=completed&limit=100" })).json());
    assert.equal(completed.jobs.length, all.jobs.length);
    const failed = JobList.parse((await t.server.app.inject({ method: "GET", url: "/api/jobs?status=failed" })).json());
    assert.deepEqual(failed.jobs, []);
  });

  test("models, ps and health describe the engine and the loaded model", async () => {
    const models = (await t.server.app.inject({ method: "GET", url: "/api/models" })).json();
    const tiny = models.models.find((m: { id: string }) => m.id === "tiny");
    assert.equal(tiny.present, true, "the tiny model was made on first use");
    assert.deepEqual(tiny.loadedOn, [0]);
    const ps = ProcessList.parse((await t.server.app.inject({ method: "GET", url: "/api/ps" })).json());
    assert.equal(ps.engines.length, 1, "one engine on a machine without a GPU");
    const engine = ps.engines[0]!;
    assert.deepEqual([engine.state, engine.model, engine.device?.kind, engine.jobId], ["ready", "tiny", "cpu", null]);
    assert.ok(engine.keepAliveExpiresAt !== null && Date.parse(engine.keepAliveExpiresAt) > Date.now() + 60_000, "about 5 min of keep-alive left");
    const health = await t.server.app.inject({ method: "GET", url: "/api/health" });
    assert.equal(health.statusCode, 200);
    assert.equal(Health.parse(health.json()).status, "ok");
  });

  test("/openapi.json is OpenAPI 3.1 generated from the route schemas, with every route", async () => {
    const res = await t.server.app.inject({ method: "GET", url: "/openapi.json" });
    assert.equal(res.statusCode, 200);
    const doc = res.json();
    assert.equal(doc.openapi, "3.1.0");
    for (const [path, method] of [
      ["/api/jobs", "post"],
      ["/api/jobs", "get"],
      ["/api/jobs/{id}", "get"],
      ["/api/jobs/{id}/cancel", "post"],
      ["/api/jobs/{id}/events", "get"],
      ["/api/jobs/{id}/video", "get"],
      ["/api/models", "get"],
      ["/api/ps", "get"],
      ["/api/health", "get"],
    ] as const) {
      assert.ok(doc.paths[path]?.[method], `${method} ${path} is documented`);
    }
    const body = doc.paths["/api/jobs"].post.requestBody.content["application/json"].schema;
    assert.equal(body.$ref, "#/components/schemas/JobRequest");
    const expected = z.toJSONSchema(JobRequest, { io: "input" }) as { $defs: Record<string, { properties: Record<string, unknown> }> };
    assert.deepEqual(doc.components.schemas.JobRequest.properties, expected.$defs.JobRequest!.properties, "the body schema is the zod one");
    assert.deepEqual(doc.components.schemas.JobRequest.required, ["prompt"]);
    assert.equal(doc.paths["/api/jobs"].post.responses["202"].content["application/json"].schema.$ref, "#/components/schemas/Job");
    const idParam = doc.paths["/api/jobs/{id}"].get.parameters.find((p: { name: string }) => p.name === "id");
    assert.equal(idParam.in, "path");
    assert.ok(idParam.schema.pattern, "the id pattern is documented");
    assert.ok(doc.components.schemas.JobEventData.oneOf ?? doc.components.schemas.JobEventData.anyOf, "the event union is documented");
    const refs = JSON.stringify(doc).match(/#\/components\/schemas\/\w+/g) ?? [];
    for (const ref of new Set(refs)) assert.ok(doc.components.schemas[ref.split("/").pop()!], `${ref} resolves`);
  });
});

describe("following and cancelling running jobs (FakeEngine, over a socket)", () => {
  let t: TestServer;
  let base: string;
  before(async () => {
    t = await startTestServer({ engine: () => new FakeEngine({ stepMs: 20 }) });
    base = await t.server.listen();
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test("a dropped stream resumed with Last-Event-ID misses nothing and repeats nothing", async () => {
    const { body } = await submit(t.server, { ...SMALL_JOB, steps: 30 });
    const first = await readSse(`${base}/api/jobs/${body.id}/events`, {}, (e) => (e.event === "progress" && e.data.data.step === 5 ? "stop" : undefined));
    const lastId = first.events.at(-1)!.id;
    const rest = await readSse(`${base}/api/jobs/${body.id}/events`, { "last-event-id": String(lastId) });
    assert.equal(rest.status, 200);
    const ids = [...first.events, ...rest.events].map((e) => e.id);
    assert.deepEqual(ids, ids.map((_, i) => i + 1), "one event per id, in order, across the reconnection");
    assert.equal(rest.events.at(-1)!.event, "completed");
    const steps = [...first.events, ...rest.events].filter((e) => e.event === "progress" && e.data.data.step !== null).map((e) => e.data.data.step);
    assert.deepEqual(steps, Array.from({ length: 30 }, (_, i) => i + 1));
  });

  test("cancel a running job: it stops between steps, ends with one cancelled event and has no video", async () => {
    const { body } = await submit(t.server, { ...SMALL_JOB, steps: 500 });
    let cancelled = false;
    const stream = await readSse(`${base}/api/jobs/${body.id}/events`, {}, (e) => {
      if (e.event === "progress" && e.data.data.step === 3 && !cancelled) {
        cancelled = true;
        void t.server.app.inject({ method: "POST", url: `/api/jobs/${body.id}/cancel` }).then((r) => {
          assert.equal(r.statusCode, 202);
          assert.equal(r.json().cancelRequested, true);
        });
      }
    });
    const terminal = stream.events.filter((e) => ["completed", "failed", "cancelled"].includes(e.event));
    assert.deepEqual(terminal.map((e) => e.event), ["cancelled"]);
    const steps = stream.events.filter((e) => e.event === "progress" && e.data.data.step !== null).length;
    assert.ok(steps < 100, `it stopped early (${steps} of 500 steps)`);
    const job = Job.parse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${body.id}` })).json());
    assert.equal(job.status, "cancelled");
    assert.deepEqual(job.artifacts, []);
    const video = await t.server.app.inject({ method: "GET", url: `/api/jobs/${body.id}/video` });
    assert.equal(video.statusCode, 409);
    assert.equal(video.json().error.code, "VIDEO_NOT_AVAILABLE");
    const again = await t.server.app.inject({ method: "POST", url: `/api/jobs/${body.id}/cancel` });
    assert.equal(again.statusCode, 409);
    assert.equal(again.json().error.code, "JOB_FINISHED");
  });

  test("cancel a queued job: it never starts, and the job behind it still runs", async () => {
    const running = await submit(t.server, { ...SMALL_JOB, steps: 40 });
    const queued = await submit(t.server, SMALL_JOB);
    const behind = await submit(t.server, SMALL_JOB);
    assert.equal(queued.body.status, "queued");
    assert.equal(queued.body.queuePosition, 1);
    const res = await t.server.app.inject({ method: "POST", url: `/api/jobs/${queued.body.id}/cancel` });
    assert.equal(res.statusCode, 202);
    assert.equal(res.json().status, "cancelled");
    await waitForStatus(t.server, behind.body.id, ["completed"]);
    assert.equal((await waitForStatus(t.server, running.body.id, ["completed"])).status, "completed");
    const events = parseSse((await t.server.app.inject({ method: "GET", url: `/api/jobs/${queued.body.id}/events` })).body);
    assert.deepEqual(events.map((e) => e.event), ["queued", "cancelled"], "never started");
  });
});
