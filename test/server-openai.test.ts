/**
 * The OpenAI-compatible /v1/videos routes on FakeEngine: the mapping of size and seconds, the video
 * object through a job's life, multipart bodies, listing with after/order, deletion (of a finished
 * and of a running video), content with Range, and every refusal naming its OpenAI field, as the
 * official `openai` client reads it.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { findCatalogModel } from "../src/catalog/models.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { jobFolder } from "../src/server/jobs/files.ts";
import { progressPercent, secondsToFrames } from "../src/server/openai/mapping.ts";
import { openaiRoutes } from "../src/server/openai/routes.ts";
import { Video, VideoList } from "../src/server/openai/schemas.ts";
import type { StoredEvent } from "../src/server/jobs/store.ts";
import { startTestServer, waitForStatus, type TestServer } from "./fixtures/server.ts";
import { removeDir } from "./fixtures/temp.ts";

const TINY = { model: "tiny", prompt: "a paper boat on a pond", size: "64x48", seconds: "0.5", steps: 3, seed: 3 };

describe("seconds → frames and progress (pure)", () => {
  const wan = findCatalogModel("wan2.1-t2v-1.3b")!;
  test("seconds × 16 fps, rounded to the nearest 4k+1", () => {
    assert.deepEqual(["4", "5", "1", "0.25", "12", 2.5].map((s) => secondsToFrames(s, wan)), [65, 81, 17, 5, 193, 41]);
  });
  test("out of range or not a number: INVALID_ARGUMENT naming seconds, with the rule and examples", () => {
    for (const bad of ["0", "0.1", "21", "-4", "four", "4s", ""]) {
      assert.throws(
        () => secondsToFrames(bad, wan),
        (e: { code: string; field: string; message: string }) =>
          e.code === "INVALID_ARGUMENT" && e.field === "seconds" && /from 0\.25 to 20/.test(e.message) && /"4" makes 65 frames/.test(e.message),
        bad,
      );
    }
  });
  test("progress: phases on a 0-100 scale, denoising steps filling most of it", () => {
    const ev = (data: StoredEvent["data"], seq: number): StoredEvent => ({ jobId: "j", seq, at: 0, data });
    const p = (phase: "text_encode" | "denoise" | "decode", step: number | null, total: number | null) =>
      ({ type: "progress", phase, step, total, s_per_step: null, eta: null, vram_bytes: null, ram_bytes: null }) as const;
    assert.equal(progressPercent([ev({ type: "started", attempt: 1, engine: 0 }, 1)]), 0);
    assert.equal(progressPercent([ev(p("text_encode", null, null), 1)]), 2);
    assert.equal(progressPercent([ev(p("denoise", 5, 10), 1)]), 48);
    assert.equal(progressPercent([ev(p("denoise", 10, 10), 1), ev(p("decode", null, null), 2)]), 92);
  });
});

describe("/v1/videos on FakeEngine", () => {
  let t: TestServer;
  let url: string;
  let client: OpenAI;

  const create = async (body: unknown) => {
    const res = await t.server.app.inject({ method: "POST", url: "/v1/videos", payload: body as object });
    return { status: res.statusCode, body: res.json() };
  };
  const waitVideo = async (id: string, statuses: string[]) => {
    for (let i = 0; i < 3000; i++) {
      const video = Video.parse((await t.server.app.inject({ method: "GET", url: `/v1/videos/${id}` })).json());
      if (statuses.includes(video.status)) return video;
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error(`video ${id} never reached ${statuses.join("/")}`);
  };

  before(async () => {
    t = await startTestServer({ routes: [openaiRoutes], engine: async () => new FakeEngine({ stepMs: 20 }) });
    url = await t.server.listen();
    client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test("create (JSON): an OpenAI video object mapped to the job; it completes with progress 100", async () => {
    const res = await create(TINY);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const video = Video.parse(res.body);
    assert.deepEqual([video.object, video.model, video.size, video.seconds, video.prompt], ["video", "tiny", "64x48", "0.56", TINY.prompt]);
    assert.ok(["queued", "in_progress"].includes(video.status));
    assert.ok(Math.abs(video.created_at - Date.now() / 1000) < 60, "created_at is in Unix seconds");
    const job = await t.server.service.get(video.id);
    assert.deepEqual([job.params.frames, job.params.width, job.params.height, job.params.steps, job.params.seed], [9, 64, 48, 3, 3], "0.5 s at 16 fps → 9 frames");
    const done = await waitVideo(video.id, ["completed", "failed"]);
    assert.deepEqual([done.status, done.progress, done.error], ["completed", 100, null]);
    assert.ok(done.completed_at !== null && done.completed_at >= done.created_at);
    const types = (await t.server.service.events(video.id)).map((e) => e.data.type);
    assert.ok(types.includes("progress") && !types.includes("preview"), `OpenAI's API cannot show previews, so none are taken: ${types.join(", ")}`);
  });

  test("while it runs, progress climbs between 0 and 100 and the status is in_progress", async () => {
    const video = Video.parse((await create({ ...TINY, steps: 40 })).body);
    const seen: number[] = [];
    for (let v = video; v.status !== "completed"; v = Video.parse((await t.server.app.inject({ method: "GET", url: `/v1/videos/${video.id}` })).json())) {
      if (v.status === "in_progress") seen.push(v.progress);
      await new Promise((r) => setTimeout(r, 15));
    }
    assert.ok(seen.some((p) => p > 5 && p < 100), `a progress inside the denoising band: ${seen.join(",")}`);
    assert.deepEqual([...seen].sort((a, b) => a - b), seen, "progress never goes back");
  });

  test("create (multipart/form-data), as the official client sends it", async () => {
    const video = await client.videos.create({ model: "tiny", prompt: "a kite", size: "64x48" as never, seconds: "0.25" as never, steps: "2", seed: "9" } as never);
    assert.equal(video.object, "video");
    const job = await t.server.service.get(video.id);
    assert.deepEqual([job.params.frames, job.params.steps, job.params.seed, job.params.width], [5, 2, 9, 64], "form fields are read as numbers");
    await waitVideo(video.id, ["completed"]);
  });

  test("refusals name the OpenAI field, in OpenAI's error shape, and the client reads them", async () => {
    const cases: Array<[Record<string, unknown>, string, RegExp]> = [
      [{ ...TINY, model: "sora-2" }, "model", /"sora-2" is not a model this server runs.*tiny, wan2\.1-t2v-1\.3b, wan2\.1-t2v-14b or auto/],
      [{ ...TINY, size: "1000x1000" }, "size", /valid sizes are WIDTHxHEIGHT with both sides multiples of 16, such as 320x192, 192x320.*nearest valid one is 1008x1008/],
      [{ ...TINY, size: "big" }, "size", /valid sizes/],
      [{ ...TINY, seconds: "30" }, "seconds", /from 0\.25 to 20/],
      [{ ...TINY, prompt: " " }, "prompt", /is empty/],
      [{ ...TINY, steps: 0 }, "steps", /whole number ≥ 1/],
      [{ ...TINY, seed: "x" }, "seed", /must be a number/],
      [{ ...TINY, input_reference: { image_url: "http://x/y.png" } }, "input_reference", /text-to-video/],
      [{ ...TINY, quality: "high" }, "quality", /is not a field of this request/],
      [{ model: "tiny" }, "prompt", /is required/],
    ];
    for (const [body, param, message] of cases) {
      const res = await create(body);
      assert.equal(res.status, 400, `${param}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.param, param);
      assert.equal(res.body.error.type, "invalid_request_error");
      assert.equal(res.body.error.code, "INVALID_ARGUMENT");
      assert.match(res.body.error.message, message);
    }
    await assert.rejects(client.videos.create({ prompt: "p", model: "sora-2", seconds: "4" }), (e: InstanceType<typeof OpenAI.BadRequestError>) => {
      assert.equal(e.status, 400);
      assert.equal(e.param, "model");
      assert.match(e.message, /sora-2.*tiny/);
      return true;
    });
    const withFile = new FormData();
    withFile.set("prompt", "p");
    withFile.set("input_reference", new Blob([new Uint8Array(64)], { type: "image/png" }), "ref.png");
    const res = await fetch(`${url}/v1/videos`, { method: "POST", body: withFile });
    assert.equal(res.status, 400);
    assert.equal((await res.json()).error.param, "input_reference");
    await assert.rejects(client.videos.retrieve("00000000-0000-4000-8000-000000000000"), (e: InstanceType<typeof OpenAI.NotFoundError>) => {
      assert.equal(e.status, 404);
      assert.equal((e.error as { type: string }).type, "not_found_error");
      return true;
    });
  });

  test("list: newest first by default, asc on request, pages chained with after/last_id", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push(Video.parse((await create({ ...TINY, seed: 100 + i })).body).id);
    for (const id of ids) await waitVideo(id, ["completed"]);
    const page = VideoList.parse((await t.server.app.inject({ method: "GET", url: "/v1/videos?limit=2" })).json());
    assert.deepEqual(page.data.map((v) => v.id), [ids[2], ids[1]]);
    assert.deepEqual([page.first_id, page.last_id, page.has_more], [ids[2], ids[1], true]);
    const next = VideoList.parse((await t.server.app.inject({ method: "GET", url: `/v1/videos?limit=1&after=${page.last_id}` })).json());
    assert.deepEqual(next.data.map((v) => v.id), [ids[0]]);
    const asc = VideoList.parse((await t.server.app.inject({ method: "GET", url: `/v1/videos?order=asc&after=${ids[0]}` })).json());
    assert.deepEqual(asc.data.map((v) => v.id), [ids[1], ids[2]]);
    assert.equal(asc.has_more, false);
    const all: string[] = [];
    for await (const v of client.videos.list({ limit: 2 })) all.push(v.id);
    assert.deepEqual(all.slice(0, 3), [...ids].reverse(), "the client's auto-pagination walks the pages");
    const bad = await t.server.app.inject({ method: "GET", url: "/v1/videos?after=00000000-0000-4000-8000-000000000000" });
    assert.equal(bad.statusCode, 400);
    assert.equal(bad.json().error.param, "after");
    const badOrder = await t.server.app.inject({ method: "GET", url: "/v1/videos?order=up" });
    assert.equal(badOrder.json().error.param, "order");
  });

  test("content: the MP4, a Range, 409 before it is done, 400 for a thumbnail", async () => {
    const video = Video.parse((await create({ ...TINY, steps: 60 })).body);
    const early = await t.server.app.inject({ method: "GET", url: `/v1/videos/${video.id}/content` });
    assert.equal(early.statusCode, 409);
    assert.equal(early.json().error.code, "VIDEO_NOT_AVAILABLE");
    await waitVideo(video.id, ["completed"]);
    const whole = await client.videos.downloadContent(video.id);
    const bytes = Buffer.from(await whole.arrayBuffer());
    assert.equal(bytes.subarray(4, 8).toString("latin1"), "ftyp");
    const part = await t.server.app.inject({ method: "GET", url: `/v1/videos/${video.id}/content`, headers: { range: "bytes=0-99" } });
    assert.equal(part.statusCode, 206);
    assert.deepEqual(part.rawPayload, bytes.subarray(0, 100));
    const thumb = await t.server.app.inject({ method: "GET", url: `/v1/videos/${video.id}/content?variant=thumbnail` });
    assert.equal(thumb.statusCode, 400);
    assert.equal(thumb.json().error.param, "variant");
  });

  test("delete: a finished video's record and files go; a running one is cancelled first", async () => {
    const done = Video.parse((await create(TINY)).body);
    await waitVideo(done.id, ["completed"]);
    const folder = jobFolder(t.options.dataDir, done.id);
    assert.ok(existsSync(folder));
    const deleted = await client.videos.delete(done.id);
    assert.deepEqual(deleted, { id: done.id, object: "video.deleted", deleted: true });
    assert.equal(existsSync(folder), false, "the video's files are gone");
    assert.equal((await t.server.app.inject({ method: "GET", url: `/v1/videos/${done.id}` })).statusCode, 404);
    assert.equal((await t.server.app.inject({ method: "GET", url: `/api/jobs/${done.id}` })).statusCode, 404, "the native API forgot it too");

    const running = Video.parse((await create({ ...TINY, steps: 5000 })).body);
    await waitVideo(running.id, ["in_progress"]);
    await waitForStatus(t.server, running.id, ["running"]);
    const res = await t.server.app.inject({ method: "DELETE", url: `/v1/videos/${running.id}` });
    assert.equal(res.statusCode, 200, res.body);
    assert.equal((await t.server.app.inject({ method: "GET", url: `/v1/videos/${running.id}` })).statusCode, 404);
    assert.equal(existsSync(jobFolder(t.options.dataDir, running.id)), false);
    const next = Video.parse((await create(TINY)).body);
    assert.equal((await waitVideo(next.id, ["completed", "failed"])).status, "completed", "the engine is free again: the running job was stopped");
    const again = await t.server.app.inject({ method: "DELETE", url: `/v1/videos/${running.id}` });
    assert.equal(again.statusCode, 404);
  });

  test("the OpenAPI document lists the /v1 routes", async () => {
    const doc = (await t.server.app.inject({ method: "GET", url: "/openapi.json" })).json();
    assert.deepEqual(Object.keys(doc.paths["/v1/videos/{id}"]).sort(), ["delete", "get"]);
    const content = doc.paths["/v1/videos"].post.requestBody.content;
    assert.deepEqual(Object.keys(content), ["application/json", "multipart/form-data"]);
    assert.ok(content["multipart/form-data"].schema.$ref.endsWith("OpenAIVideoCreate"));
    assert.ok(doc.components.schemas.OpenAIVideo.properties.progress);
  });
});
