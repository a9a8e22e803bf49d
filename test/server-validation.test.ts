/**
 * Malformed requests: each is refused with a 4xx JSON error naming the field at fault, nothing is
 * stored, no engine work starts, and no answer carries a stack trace or a file's content.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { MAX_PROMPT_CHARS } from "../src/server/schemas.ts";
import { SMALL_JOB, startTestServer, type TestServer } from "./fixtures/server.ts";
import { removeDir } from "./fixtures/temp.ts";

interface Case {
  readonly name: string;
  readonly method?: "GET" | "POST";
  readonly url?: string;
  /** A JSON value, or a raw string with `contentType`. */
  readonly body?: unknown;
  readonly raw?: string | Buffer;
  readonly contentType?: string;
  readonly headers?: Record<string, string>;
  readonly status: number;
  readonly code: string;
  readonly field: string | null;
}

const job = (patch: Record<string, unknown>) => ({ ...SMALL_JOB, ...patch });
const { prompt: _prompt, ...noPrompt } = SMALL_JOB;

const CASES: readonly Case[] = [
  { name: "no prompt", body: noPrompt, status: 400, code: "INVALID_ARGUMENT", field: "prompt" },
  { name: "a prompt that is a number", body: job({ prompt: 42 }), status: 400, code: "INVALID_ARGUMENT", field: "prompt" },
  { name: "an empty prompt", body: job({ prompt: "   " }), status: 400, code: "INVALID_ARGUMENT", field: "prompt" },
  { name: "a huge prompt", body: job({ prompt: "x".repeat(MAX_PROMPT_CHARS + 1) }), status: 400, code: "INVALID_ARGUMENT", field: "prompt" },
  { name: "a size that is not WxH", body: job({ size: "big" }), status: 400, code: "INVALID_ARGUMENT", field: "size" },
  { name: "a size not a multiple of 16", body: job({ size: "100x100" }), status: 400, code: "INVALID_ARGUMENT", field: "size" },
  { name: "a size that is a number", body: job({ size: 640 }), status: 400, code: "INVALID_ARGUMENT", field: "size" },
  { name: "frames not 4k+1", body: job({ frames: 10 }), status: 400, code: "INVALID_ARGUMENT", field: "frames" },
  { name: "frames as a string", body: job({ frames: "17" }), status: 400, code: "INVALID_ARGUMENT", field: "frames" },
  { name: "negative steps", body: job({ steps: -3 }), status: 400, code: "INVALID_ARGUMENT", field: "steps" },
  { name: "fractional steps", body: job({ steps: 2.5 }), status: 400, code: "INVALID_ARGUMENT", field: "steps" },
  { name: "negative guidance", body: job({ guidance: -1 }), status: 400, code: "INVALID_ARGUMENT", field: "guidance" },
  { name: "a negative seed", body: job({ seed: -1 }), status: 400, code: "INVALID_ARGUMENT", field: "seed" },
  { name: "a seed past 2^32", body: job({ seed: 2 ** 40 }), status: 400, code: "INVALID_ARGUMENT", field: "seed" },
  { name: "fps 0", body: job({ fps: 0 }), status: 400, code: "INVALID_ARGUMENT", field: "fps" },
  { name: "an unknown dtype", body: job({ dtype: "fp8" }), status: 400, code: "INVALID_ARGUMENT", field: "dtype" },
  { name: "a keep-alive that is not a duration", body: job({ keepAlive: "forever" }), status: 400, code: "INVALID_ARGUMENT", field: "keepAlive" },
  { name: "a negative previewEvery", body: job({ previewEvery: -2 }), status: 400, code: "INVALID_ARGUMENT", field: "previewEvery" },
  { name: "a fractional previewEvery", body: job({ previewEvery: 1.5 }), status: 400, code: "INVALID_ARGUMENT", field: "previewEvery" },
  { name: "previewEvery as a string", body: job({ previewEvery: "5" }), status: 400, code: "INVALID_ARGUMENT", field: "previewEvery" },
  { name: "randomWeights as a string", body: job({ randomWeights: "yes" }), status: 400, code: "INVALID_ARGUMENT", field: "randomWeights" },
  { name: "random weights of auto", body: job({ model: "auto", randomWeights: true }), status: 400, code: "INVALID_ARGUMENT", field: "randomWeights" },
  { name: "an unknown field", body: job({ colour: "red" }), status: 400, code: "INVALID_ARGUMENT", field: "colour" },
  { name: "an unknown model", body: job({ model: "sora-2" }), status: 404, code: "UNKNOWN_MODEL", field: "model" },
  { name: "a folder as the model", body: job({ model: "../../etc" }), status: 404, code: "UNKNOWN_MODEL", field: "model" },
  { name: "a model not downloaded", body: job({ model: "wan2.1-t2v-1.3b" }), status: 404, code: "MODEL_NOT_DOWNLOADED", field: "model" },
  { name: "a body that is not JSON", raw: "{prompt: fox", contentType: "application/json", status: 400, code: "INVALID_ARGUMENT", field: "body" },
  { name: "a JSON array", body: [SMALL_JOB], status: 400, code: "INVALID_ARGUMENT", field: "body" },
  { name: "an empty JSON body", raw: "", contentType: "application/json", status: 400, code: "INVALID_ARGUMENT", field: "body" },
  { name: "a body of another type", raw: "prompt=fox", contentType: "text/plain", status: 415, code: "UNSUPPORTED_MEDIA_TYPE", field: "body" },
  {
    name: "an oversized body",
    raw: JSON.stringify(job({ prompt: "x".repeat(2 * 1024 * 1024) })),
    contentType: "application/json",
    status: 413,
    code: "PAYLOAD_TOO_LARGE",
    field: "body",
  },
  { name: "a path-traversal job id (encoded)", method: "GET", url: "/api/jobs/..%2F..%2Fetc%2Fpasswd", status: 400, code: "INVALID_ARGUMENT", field: "id" },
  { name: "a path-traversal video id (encoded)", method: "GET", url: "/api/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/video", status: 400, code: "INVALID_ARGUMENT", field: "id" },
  { name: "a path-traversal cancel", method: "POST", url: "/api/jobs/..%2Fkino.db/cancel", status: 400, code: "INVALID_ARGUMENT", field: "id" },
  { name: "a job id that is not a UUID", method: "GET", url: "/api/jobs/1234", status: 400, code: "INVALID_ARGUMENT", field: "id" },
  { name: "an unknown job", method: "GET", url: `/api/jobs/${randomUUID()}`, status: 404, code: "JOB_NOT_FOUND", field: "id" },
  { name: "cancelling an unknown job", method: "POST", url: `/api/jobs/${randomUUID()}/cancel`, status: 404, code: "JOB_NOT_FOUND", field: "id" },
  { name: "a preview of an unknown job", method: "GET", url: `/api/jobs/${randomUUID()}/previews/1`, status: 404, code: "JOB_NOT_FOUND", field: "id" },
  { name: "a preview step that is not a number", method: "GET", url: `/api/jobs/${randomUUID()}/previews/last`, status: 400, code: "INVALID_ARGUMENT", field: "step" },
  { name: "a path-traversal preview step (encoded)", method: "GET", url: `/api/jobs/${randomUUID()}/previews/..%2F..%2F..%2Fkino.db`, status: 400, code: "INVALID_ARGUMENT", field: "step" },
  { name: "events of an unknown job", method: "GET", url: `/api/jobs/${randomUUID()}/events`, status: 404, code: "JOB_NOT_FOUND", field: "id" },
  { name: "a list limit of 0", method: "GET", url: "/api/jobs?limit=0", status: 400, code: "INVALID_ARGUMENT", field: "limit" },
  { name: "a list status that does not exist", method: "GET", url: "/api/jobs?status=done", status: 400, code: "INVALID_ARGUMENT", field: "status" },
  { name: "a list cursor that is not one", method: "GET", url: "/api/jobs?cursor=abc", status: 400, code: "INVALID_ARGUMENT", field: "cursor" },
  { name: "an unknown query parameter", method: "GET", url: "/api/jobs?sort=asc", status: 400, code: "INVALID_ARGUMENT", field: "sort" },
  { name: "a route that does not exist", method: "GET", url: "/api/nothing", status: 404, code: "ROUTE_NOT_FOUND", field: null },
];

describe("malformed requests", () => {
  let t: TestServer;
  let started = 0;
  before(async () => {
    t = await startTestServer({
      engine: async () => {
        started++;
        const { FakeEngine } = await import("../src/engine/fake.ts");
        return new FakeEngine();
      },
    });
    await t.server.scheduler.whenReady();
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test(`the table has at least 20 cases (${CASES.length})`, () => assert.ok(CASES.length >= 20));

  for (const c of CASES) {
    test(`${c.name} → ${c.status} ${c.code} naming ${c.field ?? "no field"}`, async () => {
      const res = await t.server.app.inject({
        method: c.method ?? "POST",
        url: c.url ?? "/api/jobs",
        ...(c.raw !== undefined
          ? { payload: c.raw, headers: { "content-type": c.contentType!, ...c.headers } }
          : c.body !== undefined
            ? { payload: c.body as object, headers: c.headers }
            : { headers: c.headers }),
      });
      assert.equal(res.statusCode, c.status, res.body.slice(0, 500));
      assert.match(String(res.headers["content-type"]), /^application\/json/);
      const body = res.json();
      assert.deepEqual(Object.keys(body), ["error"]);
      assert.equal(body.error.code, c.code);
      assert.equal(body.error.field, c.field);
      if (c.field !== null) assert.ok(body.error.message.startsWith(`${c.field}:`), `the message names the field: ${body.error.message}`);
      assert.ok(body.error.message.length < 1000, "the message is short (a huge value is not echoed)");
      assert.doesNotMatch(res.body, /\n\s+at |node_modules|\.ts:\d+|root:x:0:0/, "no stack trace, no source path, no file content");
    });
  }

  test("a raw ../ in the path reaches no file: a JSON 404", async () => {
    const res = await t.server.app.inject({ method: "GET", url: "/api/jobs/../../etc/passwd" });
    assert.equal(res.statusCode, 404);
    assert.equal(res.json().error.code, "ROUTE_NOT_FOUND");
    assert.doesNotMatch(res.body, /root:/);
  });

  test("the messages say what is legal: the nearest size and frame count", async () => {
    const size = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: job({ size: "100x100" }) });
    assert.match(size.json().error.message, /nearest legal size: 96x96/);
    const frames = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: job({ frames: 10 }) });
    assert.match(frames.json().error.message, /nearest: 9/);
  });

  test("a Last-Event-ID that is not an event id → 400 naming the header", async () => {
    const ok = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: SMALL_JOB });
    const res = await t.server.app.inject({ method: "GET", url: `/api/jobs/${ok.json().id}/events`, headers: { "last-event-id": "../1" } });
    assert.equal(res.statusCode, 400);
    assert.equal(res.json().error.field, "Last-Event-ID");
  });

  test("no refused request was stored, and each was refused before any engine work", async () => {
    const list = (await t.server.app.inject({ method: "GET", url: "/api/jobs?limit=100" })).json();
    assert.equal(list.jobs.length, 1, "only the valid job of the Last-Event-ID test");
    assert.equal(started, 1, "one engine, started with the server; no request started another");
  });
});
