/**
 * Previews in the native API on FakeEngine: `preview` events at the steps `previewEvery` asks for (by
 * default about ten per job; none with 0), each url serving the PNG the engine sent (signature, IHDR
 * size, a whole image), replayed after Last-Event-ID; the preview route's refusals (400 naming the
 * field, 404 for a job or a preview that does not exist, none kept of a cancelled job, the key asked
 * for); jobs of one shape batched together whatever their previews; previews that arrive right
 * before the engine's answer, recorded before the job's end; and a preview that cannot be written,
 * which is logged while the job completes without it.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { existsSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { PNG } from "pngjs";
import type { EngineClient } from "../src/engine/client.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { KinoError } from "../src/errors.ts";
import type { EngineEvent } from "../src/protocol/engine.ts";
import { jobFolder, PREVIEWS_FOLDER } from "../src/server/jobs/files.ts";
import { defaultPreviewEvery } from "../src/api/generate-options.ts";
import { Job } from "../src/server/schemas.ts";
import { pngBytesSize, previewSteps } from "./engine-conformance.ts";
import { parseSse, readSse, SMALL_JOB, startTestServer, submit, waitForStatus, withTestServer, type SseEvent, type TestServer } from "./fixtures/server.ts";
import { removeDir } from "./fixtures/temp.ts";

const TERMINAL = ["completed", "failed", "cancelled"];

/** The job's events as its stream sends them, from the start or after `lastEventId`. */
async function streamOf(t: TestServer, id: string, lastEventId?: number): Promise<SseEvent[]> {
  const res = await t.server.app.inject({ method: "GET", url: `/api/jobs/${id}/events`, headers: lastEventId === undefined ? {} : { "last-event-id": String(lastEventId) } });
  assert.equal(res.statusCode, 200);
  return parseSse(res.body);
}

const previewsOf = (events: readonly SseEvent[]) => events.filter((e) => e.event === "preview").map((e) => e.data.data);

/** Submits a job and waits for it to end; its id. */
async function run(t: TestServer, body: object): Promise<string> {
  const res = await submit(t.server, body);
  assert.equal(res.status, 202, JSON.stringify(res.body));
  await waitForStatus(t.server, res.body.id, TERMINAL as Job["status"][]);
  return res.body.id;
}

describe("preview events and their images (FakeEngine)", () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer();
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test("previewEvery 2 of 5 steps: preview events at steps 2, 4 and 5, before the output; each url serves the PNG", async () => {
    const id = await run(t, { ...SMALL_JOB, steps: 5, previewEvery: 2 });
    const events = await streamOf(t, id);
    assert.equal(events.at(-1)?.event, "completed");
    const previews = previewsOf(events);
    assert.deepEqual(previews.map((p) => p.step), [2, 4, 5]);
    for (const p of previews) {
      // 64x48 video: latents of 8x6.
      assert.deepEqual(p, { type: "preview", step: p.step, total: 5, width: 8, height: 6, url: `/api/jobs/${id}/previews/${p.step}` });
      const res = await t.server.app.inject({ method: "GET", url: p.url });
      assert.equal(res.statusCode, 200);
      assert.equal(res.headers["content-type"], "image/png");
      assert.equal(Number(res.headers["content-length"]), res.rawPayload.length);
      assert.deepEqual(pngBytesSize(res.rawPayload), { width: 8, height: 6 }, "the signature, and the IHDR of the event's size");
      const image = PNG.sync.read(res.rawPayload);
      assert.equal(image.data.length, 8 * 6 * 4, "a whole image");
    }
    const step = (s: number) => t.server.app.inject({ method: "GET", url: `/api/jobs/${id}/previews/${s}` });
    assert.notDeepEqual((await step(2)).rawPayload, (await step(5)).rawPayload, "each step's own image");
    const types = events.map((e) => e.event);
    assert.ok(types.lastIndexOf("preview") < types.indexOf("output"), `every preview comes before the output and the end: ${types.join(", ")}`);
    assert.deepEqual(events.map((e) => e.id), events.map((_, k) => k + 1), "ids 1..n, previews among them");
  });

  test("Last-Event-ID: a resumed stream replays the previews after that id, and only those", async () => {
    const id = await run(t, { ...SMALL_JOB, steps: 6, previewEvery: 1 });
    const all = await streamOf(t, id);
    const second = all.find((e) => e.event === "preview" && e.data.data.step === 2)!;
    const resumed = await streamOf(t, id, second.id);
    assert.deepEqual(previewsOf(resumed).map((p) => p.step), [3, 4, 5, 6]);
    assert.deepEqual(resumed.map((e) => e.id), all.filter((e) => e.id > second.id).map((e) => e.id));
  });

  test("by default, a preview every max(1, round(steps / 10)) steps and at the last", async () => {
    assert.deepEqual([1, 3, 10, 14, 15, 25, 50].map(defaultPreviewEvery), [1, 1, 1, 1, 2, 3, 5]);
    const few = await run(t, { ...SMALL_JOB, steps: 3 });
    assert.deepEqual(previewsOf(await streamOf(t, few)).map((p) => p.step), [1, 2, 3], "3 steps: each");
    const job = await t.server.app.inject({ method: "GET", url: `/api/jobs/${few}` });
    assert.equal(job.json().previewEvery, 1, "the job says how often it previews (the default resolved)");
    const many = await run(t, { ...SMALL_JOB, steps: 25 });
    assert.equal((await t.server.app.inject({ method: "GET", url: `/api/jobs/${many}` })).json().previewEvery, 3);
    assert.deepEqual(previewsOf(await streamOf(t, many)).map((p) => p.step), previewSteps(3, 25), "25 steps: every 3rd and the 25th");
    assert.deepEqual(previewSteps(3, 25), [3, 6, 9, 12, 15, 18, 21, 24, 25]);
  });

  test("previewEvery 0: no preview events, and the route says the job takes none", async () => {
    const id = await run(t, { ...SMALL_JOB, previewEvery: 0 });
    const events = await streamOf(t, id);
    assert.equal(events.at(-1)?.event, "completed");
    assert.deepEqual(previewsOf(events), []);
    const res = await t.server.app.inject({ method: "GET", url: `/api/jobs/${id}/previews/1` });
    assert.equal(res.statusCode, 404);
    assert.equal(res.json().error.code, "PREVIEW_NOT_FOUND");
    assert.match(res.json().error.message, /takes no previews \(previewEvery 0\)/);
  });

  test("previewEvery is checked: negative, fractional or not a number → 400 naming it; nothing stored", async () => {
    const before = (await t.server.service.list({ limit: 100 })).jobs.length;
    for (const previewEvery of [-1, 2.5, "2", true, null, 2 ** 60]) {
      const res = await submit(t.server, { ...SMALL_JOB, previewEvery });
      assert.equal(res.status, 400, `${JSON.stringify(previewEvery)}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.code, "INVALID_ARGUMENT");
      assert.equal(res.body.error.field, "previewEvery");
      assert.match(res.body.error.message, /^previewEvery: /);
    }
    const negative = await submit(t.server, { ...SMALL_JOB, previewEvery: -1 });
    assert.match(negative.body.error.message, /whole number ≥ 0.*0 for none.*got -1/);
    assert.equal((await t.server.service.list({ limit: 100 })).jobs.length, before);
  });

  test("the preview route: 404 for an unknown job or a step without a preview, 400 naming id or step", async () => {
    const id = await run(t, { ...SMALL_JOB, steps: 5, previewEvery: 2 });
    const get = (url: string) => t.server.app.inject({ method: "GET", url });
    const refusals: Array<[string, number, string, string | null]> = [
      [`/api/jobs/${randomUUID()}/previews/1`, 404, "JOB_NOT_FOUND", "id"],
      [`/api/jobs/${id}/previews/3`, 404, "PREVIEW_NOT_FOUND", "step"],
      [`/api/jobs/${id}/previews/6`, 404, "PREVIEW_NOT_FOUND", "step"],
      [`/api/jobs/${id}/previews/0`, 400, "INVALID_ARGUMENT", "step"],
      [`/api/jobs/${id}/previews/-1`, 400, "INVALID_ARGUMENT", "step"],
      [`/api/jobs/${id}/previews/1.5`, 400, "INVALID_ARGUMENT", "step"],
      [`/api/jobs/${id}/previews/02`, 400, "INVALID_ARGUMENT", "step"],
      [`/api/jobs/${id}/previews/1e3`, 400, "INVALID_ARGUMENT", "step"],
      [`/api/jobs/${id}/previews/2.png`, 400, "INVALID_ARGUMENT", "step"],
      [`/api/jobs/${id}/previews/..%2F..%2F..%2Fkino.db`, 400, "INVALID_ARGUMENT", "step"],
      // A dot segment is resolved before routing: /api/jobs/<id>/, which no route answers.
      [`/api/jobs/${id}/previews/%2e%2e`, 404, "ROUTE_NOT_FOUND", null],
      [`/api/jobs/..%2F..%2Fkino.db/previews/2`, 400, "INVALID_ARGUMENT", "id"],
    ];
    for (const [url, status, code, field] of refusals) {
      const res = await get(url);
      assert.equal(res.statusCode, status, `${url}: ${res.body}`);
      assert.match(String(res.headers["content-type"]), /^application\/json/, url);
      assert.deepEqual([res.json().error.code, res.json().error.field], [code, field], url);
    }
    assert.match((await get(`/api/jobs/${id}/previews/3`)).json().error.message, /no preview of step 3: none was taken there \(it took one every 2 steps/);
    assert.equal((await get(`/api/jobs/${id}/previews/2`)).statusCode, 200, "while step 2's is served");
  });

  test("a cancelled job keeps no previews: its preview urls answer 404", async () => {
    const res = await submit(t.server, { ...SMALL_JOB, steps: 5000, previewEvery: 1 });
    const id: string = res.body.id;
    const base = await t.server.listen();
    const { events } = await readSse(`${base}/api/jobs/${id}/events`, {}, (e) => {
      if (e.event === "preview" && e.data.data.step === 3) void t.server.app.inject({ method: "POST", url: `/api/jobs/${id}/cancel` });
    });
    assert.equal(events.at(-1)?.event, "cancelled");
    const previews = previewsOf(events);
    assert.ok(previews.length >= 3, "previews came while it ran");
    const gone = await t.server.app.inject({ method: "GET", url: previews[0].url });
    assert.equal(gone.statusCode, 404);
    assert.equal(gone.json().error.code, "PREVIEW_NOT_FOUND");
    assert.match(gone.json().error.message, /the previews of a job that was cancelled are not kept/);
  });

  test("OpenAPI documents the route, its PNG answer and the preview event", async () => {
    const doc = (await t.server.app.inject({ method: "GET", url: "/openapi.json" })).json();
    const op = doc.paths["/api/jobs/{id}/previews/{step}"]?.get;
    assert.ok(op, "GET /api/jobs/{id}/previews/{step} is documented");
    assert.ok(op.responses["200"].content["image/png"]);
    assert.deepEqual(op.parameters.map((p: { name: string; in: string }) => `${p.in}:${p.name}`), ["path:id", "path:step"]);
    assert.ok(doc.components.schemas.JobRequest.properties.previewEvery, "previewEvery is a documented request field");
    const variants: Array<{ properties: { type: { const: string } } }> = doc.components.schemas.JobEventData.oneOf ?? doc.components.schemas.JobEventData.anyOf;
    assert.ok(variants.some((v) => v.properties.type.const === "preview"), "the preview event is documented");
  });
});

test("the preview route asks for the API key like every /api route", async () => {
  const KEY = "preview-test-key-0123456789";
  await withTestServer({ options: { apiKey: KEY } }, async (t) => {
    const auth = { authorization: `Bearer ${KEY}` };
    const res = await submit(t.server, { ...SMALL_JOB, previewEvery: 1 }, auth);
    await waitForStatus(t.server, res.body.id, ["completed"]);
    const url = `/api/jobs/${res.body.id}/previews/1`;
    const without = await t.server.app.inject({ method: "GET", url });
    assert.equal(without.statusCode, 401);
    assert.equal(without.json().error.code, "UNAUTHORIZED");
    const withKey = await t.server.app.inject({ method: "GET", url, headers: auth });
    assert.equal(withKey.statusCode, 200);
    assert.equal(withKey.headers["content-type"], "image/png");
  });
});

test("jobs of one shape batch together whatever their previews: each gets its own, or none", async () => {
  await withTestServer({ engine: async () => new FakeEngine({ stepMs: 20 }) }, async (t) => {
    const blocker = await submit(t.server, { ...SMALL_JOB, steps: 30, seed: 1 });
    await waitForStatus(t.server, blocker.body.id, ["running"]);
    const withPreviews = await submit(t.server, { ...SMALL_JOB, steps: 4, seed: 2, previewEvery: 2 });
    const without = await submit(t.server, { ...SMALL_JOB, steps: 4, seed: 3, previewEvery: 0 });
    const done = await Promise.all([withPreviews, without].map((r) => waitForStatus(t.server, r.body.id, ["completed", "failed"])));
    assert.deepEqual(done.map((j) => [j.status, j.result?.batchSize]), [["completed", 2], ["completed", 2]], "one batch of two");
    assert.deepEqual(previewsOf(await streamOf(t, withPreviews.body.id)).map((p) => p.step), [2, 4]);
    assert.deepEqual(previewsOf(await streamOf(t, without.body.id)), []);
  });
});

/**
 * A FakeEngine whose previews reach the caller only with its answer, in the same tick (as a real
 * engine's last preview can), followed by a success or by `fail`.
 */
function lateEngine(fail?: KinoError): EngineClient {
  const fake = new FakeEngine({ stepMs: 2 });
  const generate = fake.generate.bind(fake);
  fake.generate = async (job, options = {}) => {
    const held: EngineEvent[] = [];
    const result = await generate(job, { ...options, onEvent: (e) => (e.kind === "preview" ? held.push(e) : options.onEvent?.(e)) });
    for (const e of held) options.onEvent?.(e);
    if (fail !== undefined) throw fail;
    return result;
  };
  return fake;
}

test("previews that arrive with the engine's answer are written and announced before the job's end", async () => {
  await withTestServer({ engine: async () => lateEngine() }, async (t) => {
    const id = await run(t, { ...SMALL_JOB, steps: 4, previewEvery: 1 });
    const events = await streamOf(t, id);
    assert.deepEqual(previewsOf(events).map((p) => p.step), [1, 2, 3, 4], "every preview is in the stream");
    assert.equal(events.at(-1)?.event, "completed", `the terminal event is the last: ${events.map((e) => e.event).join(", ")}`);
    assert.equal((await t.server.app.inject({ method: "GET", url: `/api/jobs/${id}/previews/4` })).statusCode, 200);
  });
});

test("previews that arrive with a failure leave nothing behind: the job's folder is removed after them", async () => {
  await withTestServer({ engine: async () => lateEngine(new KinoError("ENCODER_FAILED", "the encoder broke")) }, async (t) => {
    const id = await run(t, { ...SMALL_JOB, steps: 4, previewEvery: 1 });
    const events = await streamOf(t, id);
    assert.equal(events.at(-1)?.event, "failed");
    assert.deepEqual(previewsOf(events).map((p) => p.step), [1, 2, 3, 4], "announced before the failure");
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(existsSync(jobFolder(t.options.dataDir, id)), false, "no late write recreated the folder");
  });
});

test("a preview that cannot be written is logged and not announced; the job completes", async () => {
  const warnings: string[] = [];
  const logger = { debug() {}, info() {}, warn: (m: string) => void warnings.push(m) };
  // An engine that puts a file where the job's previews folder goes, before the job runs.
  const engine = (): EngineClient => {
    const fake = new FakeEngine({ stepMs: 2 });
    const generate = fake.generate.bind(fake);
    fake.generate = (job, options) => {
      if (job.output.video !== null) writeFileSync(join(dirname(job.output.video), PREVIEWS_FOLDER), "not a folder");
      return generate(job, options);
    };
    return fake;
  };
  await withTestServer({ engine: async () => engine(), logger }, async (t) => {
    const id = await run(t, { ...SMALL_JOB, steps: 3, previewEvery: 1 });
    const events = await streamOf(t, id);
    assert.equal(events.at(-1)?.event, "completed");
    assert.deepEqual(previewsOf(events), [], "nothing announced that cannot be served");
    assert.deepEqual(warnings.filter((w) => w.includes("could not write the preview")).length, 3, warnings.join("\n"));
    assert.match(warnings.find((w) => w.includes("preview"))!, new RegExp(`job ${id}: could not write the preview of step 1: `));
    assert.equal((await t.server.app.inject({ method: "GET", url: "/api/health" })).statusCode, 200, "the server is up");
  });
});
