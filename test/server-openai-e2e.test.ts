/**
 * The official `openai` npm client pointed at kino through baseURL, on the real Python engine
 * (SubprocessEngine) on the CPU with kino's tiny model: create (the client sends multipart), poll
 * retrieve until completed, list, download the content (checked with ffprobe), delete.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { resolveConfig } from "../src/config/config.ts";
import { SubprocessEngine } from "../src/engine/subprocess.ts";
import { makeTinyCheckpoint } from "../src/engine/tools.ts";
import { probeVideo } from "../src/media/ffprobe.ts";
import { openaiRoutes } from "../src/server/openai/routes.ts";
import { startTestServer, type TestServer } from "./fixtures/server.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const API_KEY = "kino-test-key-0123456789";

describe("the openai npm client against kino serve (real engine, tiny model, CPU)", { timeout: 240_000 }, () => {
  const home = tempDir("kino-openai-e2e-");
  const base = resolveConfig(process.env);
  const config = resolveConfig({ KINO_HOME: home, HOME: home }, { python: base.python, cache: join(home, "cache"), stallTimeoutMs: 120_000 });
  let t: TestServer;
  let client: OpenAI;

  before(async () => {
    t = await startTestServer({
      home,
      config,
      options: { apiKey: API_KEY },
      routes: [openaiRoutes],
      engine: () => SubprocessEngine.start(config),
      makeTiny: (dir) => makeTinyCheckpoint(config, dir, 3),
    });
    client = new OpenAI({ baseURL: `${await t.server.listen()}/v1`, apiKey: API_KEY, maxRetries: 0 });
  });
  after(async () => {
    await t?.server.close();
    removeDir(home);
  });

  test("create, poll retrieve until completed, list, downloadContent, delete", async () => {
    // size and seconds outside OpenAI's typed values: kino's tiny model makes small clips.
    const created = await client.videos.create({ model: "tiny", prompt: "a lighthouse at dusk", size: "64x48", seconds: "0.5", steps: "3", seed: "5" } as never);
    assert.equal(created.object, "video");
    assert.ok(["queued", "in_progress"].includes(created.status), created.status);
    assert.deepEqual([created.model, created.size, created.seconds], ["tiny", "64x48", "0.56"]);

    let video = created;
    const progress: number[] = [];
    while (video.status === "queued" || video.status === "in_progress") {
      await new Promise((r) => setTimeout(r, 100));
      video = await client.videos.retrieve(created.id);
      progress.push(video.progress);
    }
    assert.equal(video.status, "completed", JSON.stringify(video.error));
    assert.equal(video.progress, 100);
    assert.ok(video.completed_at !== null);

    const page = await client.videos.list({ limit: 10 });
    assert.deepEqual(page.data.map((v) => v.id), [created.id]);
    assert.equal(page.has_more, false);

    const content = await client.videos.downloadContent(created.id);
    assert.equal(content.headers.get("content-type"), "video/mp4");
    const file = join(home, "openai.mp4");
    writeFileSync(file, Buffer.from(await content.arrayBuffer()));
    const probe = await probeVideo(file);
    assert.deepEqual([probe.codec, probe.width, probe.height, probe.frames, probe.fps], ["h264", 64, 48, 9, 16], "0.5 s at 16 fps: 9 frames");

    const deleted = await client.videos.delete(created.id);
    assert.deepEqual(deleted, { id: created.id, object: "video.deleted", deleted: true });
    await assert.rejects(client.videos.retrieve(created.id), (e: InstanceType<typeof OpenAI.NotFoundError>) => e.status === 404);
    assert.deepEqual((await client.videos.list()).data, []);
  });

  test("a wrong key is refused as the client expects (401, AuthenticationError)", async () => {
    const wrong = new OpenAI({ baseURL: client.baseURL, apiKey: "wrong-key", maxRetries: 0 });
    await assert.rejects(wrong.videos.list(), (e: unknown) => e instanceof OpenAI.AuthenticationError);
  });
});
