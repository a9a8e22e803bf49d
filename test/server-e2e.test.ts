/**
 * End to end through the real Python engine (SubprocessEngine) on the CPU, kino's tiny model made on
 * first use, over a real socket: a job submitted, followed over SSE until completed, its previews
 * fetched as the PNGs the engine made, its video fetched with a Range request and whole, and checked
 * with ffprobe; two jobs of one shape queued behind a running one run as one batch, each with its own
 * events, previews and video; then the engine killed
 * with SIGKILL mid-job: that job fails with a clear error, the server stays up, the next job succeeds.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { REPO_ROOT, resolveConfig } from "../src/config/config.ts";
import { SubprocessEngine } from "../src/engine/subprocess.ts";
import { makeTinyCheckpoint } from "../src/engine/tools.ts";
import { probeVideo } from "../src/media/ffprobe.ts";
import { Job } from "../src/server/schemas.ts";
import { pngBytesSize } from "./engine-conformance.ts";
import { readSse, startTestServer, type SseEvent, type TestServer } from "./fixtures/server.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const JOB = { model: "tiny", prompt: "a lighthouse at dusk", size: "64x48", frames: 9, steps: 4, seed: 5 };
const TERMINAL = ["completed", "failed", "cancelled"];

describe("kino serve on the real engine, tiny model, CPU", { timeout: 240_000 }, () => {
  const home = tempDir("kino-serve-e2e-");
  // The engine's Python environment as the developer's config finds it; everything else in `home`.
  const base = resolveConfig(process.env);
  const config = resolveConfig({ KINO_HOME: home, HOME: home }, { python: base.python, cache: join(home, "cache"), stallTimeoutMs: 120_000 });
  const engines: SubprocessEngine[] = [];
  let t: TestServer;
  let url: string;

  const post = async (body: unknown) => {
    const res = await fetch(`${url}/api/jobs`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    assert.equal(res.status, 202, await res.clone().text());
    return Job.parse(await res.json());
  };

  before(async () => {
    t = await startTestServer({
      home,
      config,
      engine: async () => engines[engines.push(await SubprocessEngine.start(config)) - 1]!,
      // The real make-tiny, as `kino generate` would run it (the fixture fakes it by default).
      makeTiny: (dir) => makeTinyCheckpoint(config, dir, 3),
    });
    url = await t.server.listen();
  });
  after(async () => {
    await t?.server.close();
    removeDir(home);
  });

  test("a job over the native API: SSE until completed, its previews, the video by Range and whole, checked with ffprobe", async () => {
    const job = await post(JOB);
    const { status, events } = await readSse(`${url}/api/jobs/${job.id}/events`);
    assert.equal(status, 200);
    const types = events.map((e) => e.event);
    assert.deepEqual(types.filter((x) => TERMINAL.includes(x)), ["completed"], `one terminal event: ${types.join(", ")}`);
    assert.equal(types.at(-1), "completed");
    for (const type of ["queued", "started", "model.loading", "progress", "output"]) assert.ok(types.includes(type), `a ${type} event`);
    const steps = events.filter((e) => e.event === "progress" && e.data.data.step !== null).map((e) => e.data.data);
    assert.deepEqual(steps.map((s) => s.step), [1, 2, 3, 4]);
    assert.ok(steps.every((s) => s.total === 4 && s.s_per_step > 0));
    // 4 steps: by default a preview at each (max(1, round(4 / 10))), at the latents' size (64x48 / 8).
    const previews = events.filter((e) => e.event === "preview").map((e) => e.data.data);
    assert.deepEqual(previews.map((p) => p.step), [1, 2, 3, 4]);
    for (const p of previews) {
      assert.deepEqual([p.total, p.width, p.height], [4, 8, 6]);
      const res = await fetch(`${url}${p.url}`);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get("content-type"), "image/png");
      assert.deepEqual(pngBytesSize(Buffer.from(await res.arrayBuffer()), `preview ${p.step}`), { width: 8, height: 6 });
    }

    const video = `${url}/api/jobs/${job.id}/video`;
    const part = await fetch(video, { headers: { range: "bytes=0-1023" } });
    assert.equal(part.status, 206);
    const whole = await fetch(video);
    assert.equal(whole.status, 200);
    const bytes = Buffer.from(await whole.arrayBuffer());
    assert.match(part.headers.get("content-range") ?? "", new RegExp(`^bytes 0-1023/${bytes.length}$`));
    assert.deepEqual(Buffer.from(await part.arrayBuffer()), bytes.subarray(0, 1024));
    const file = join(home, "downloaded.mp4");
    writeFileSync(file, bytes);
    const probe = await probeVideo(file);
    assert.deepEqual([probe.codec, probe.pixFmt, probe.width, probe.height, probe.frames, probe.fps], ["h264", "yuv420p", 64, 48, 9, 16]);

    const done = Job.parse(await (await fetch(`${url}/api/jobs/${job.id}`)).json());
    assert.equal(done.status, "completed");
    assert.equal(done.artifacts[0]!.bytes, bytes.length);
    assert.deepEqual([done.result?.frames, done.result?.width, done.result?.height], [9, 64, 48]);
  });

  test("two jobs of one shape queued behind a running one run as one batch, each with its own events, previews, result and video", async () => {
    const blocker = await post({ ...JOB, steps: 60, seed: 1 });
    const status = async (id: string) => Job.parse(await (await fetch(`${url}/api/jobs/${id}`)).json()).status;
    while ((await status(blocker.id)) !== "running") await new Promise((r) => setTimeout(r, 10));
    const jobs = [await post({ ...JOB, prompt: "a red kite over the sea", seed: 11 }), await post({ ...JOB, prompt: "a green lantern", seed: 12 })];
    assert.equal(await status(blocker.id), "running", "both jobs were queued while the first one ran");
    const streams = await Promise.all(jobs.map((j) => readSse(`${url}/api/jobs/${j.id}/events`)));
    const videos: Buffer[] = [];
    for (const [k, { events }] of streams.entries()) {
      const types = events.map((e) => e.event);
      assert.deepEqual(types.filter((x) => TERMINAL.includes(x)), ["completed"], `job ${k}: ${types.join(", ")}`);
      const notice = events.find((e) => e.event === "notice")?.data.data.message ?? "";
      assert.match(notice, /runs in one batch with 1 other job of the same model and shape/, `job ${k} ran in the batch`);
      const steps = events.filter((e) => e.event === "progress" && e.data.data.step !== null).map((e) => e.data.data.step);
      assert.deepEqual(steps, [1, 2, 3, 4], `job ${k} has its own step events`);
      const previews = events.filter((e) => e.event === "preview").map((e) => e.data.data);
      assert.deepEqual(previews.map((p) => p.url), [1, 2, 3, 4].map((i) => `/api/jobs/${jobs[k]!.id}/previews/${i}`), `job ${k} has its own previews`);
      const done = Job.parse(await (await fetch(`${url}/api/jobs/${jobs[k]!.id}`)).json());
      assert.equal(done.result?.batchSize, 2, "the engine ran both in one loop");
      const bytes = Buffer.from(await (await fetch(`${url}/api/jobs/${jobs[k]!.id}/video`)).arrayBuffer());
      const file = join(home, `batch-${k}.mp4`);
      writeFileSync(file, bytes);
      const probe = await probeVideo(file);
      assert.deepEqual([probe.codec, probe.width, probe.height, probe.frames], ["h264", 64, 48, 9]);
      videos.push(bytes);
    }
    assert.ok(!videos[0]!.equals(videos[1]!), "each job has its own video (its own prompt and seed)");
    assert.equal(await status(blocker.id), "completed");
  });

  test("SIGKILL of the engine mid-job: that job fails with a clear error, the server stays up, the next job succeeds", async () => {
    const job = await post({ ...JOB, steps: 5000 });
    let killed: number | undefined;
    const { events } = await readSse(`${url}/api/jobs/${job.id}/events`, {}, (e: SseEvent) => {
      if (killed === undefined && e.event === "progress" && e.data.data.step === 2) {
        killed = engines.at(-1)!.pid;
        process.kill(killed!, "SIGKILL");
      }
    });
    assert.ok(killed !== undefined, "the job reached step 2 and the engine was killed");
    const terminal = events.filter((e) => TERMINAL.includes(e.event));
    assert.deepEqual(terminal.map((e) => e.event), ["failed"]);
    const error = terminal[0]!.data.data.error;
    assert.equal(error.code, "ENGINE_CRASHED");
    assert.match(error.message, /the engine stopped while running this job \(the engine process was killed by SIGKILL during generate/);
    assert.match(error.message, /a fresh engine serves the next one/);

    const health = await fetch(`${url}/api/health`);
    assert.ok(health.status === 200, "the server is up");
    const next = await post({ ...JOB, seed: 6 });
    const after = await readSse(`${url}/api/jobs/${next.id}/events`);
    assert.equal(after.events.at(-1)?.event, "completed", after.events.map((e) => e.event).join(", "));
    assert.equal(engines.length, 2, "a fresh engine ran the next job");
    assert.notEqual(engines[1]!.pid, killed);
    const ps = await (await fetch(`${url}/api/ps`)).json();
    assert.equal(ps.engines[0].restarts, 1);
    const failed = Job.parse(await (await fetch(`${url}/api/jobs/${job.id}`)).json());
    assert.equal(failed.status, "failed");
    assert.deepEqual(failed.artifacts, []);
  });

  test("bin/kino serve listens, answers, and on SIGTERM shuts down cleanly (exit 0)", async () => {
    const serveHome = join(home, "cli");
    const child = spawn(join(REPO_ROOT, "bin", "kino"), ["serve", "--port", "0"], {
      env: { ...process.env, KINO_HOME: serveHome, KINO_API_KEY: "" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    const exited = new Promise<number | null>((resolve) => child.once("close", (code) => resolve(code)));
    const listening = await new Promise<string>((resolve, reject) => {
      child.stderr.setEncoding("utf8").on("data", (text: string) => {
        stderr += text;
        const match = /listening on (http:\/\/[\d.]+:\d+)/.exec(stderr);
        if (match !== null) resolve(match[1]!);
      });
      void exited.then(() => reject(new Error(`kino serve exited early: ${stderr}`)));
    });
    const health = await fetch(`${listening}/api/health`);
    assert.equal(health.status, 200);
    assert.ok(["ok", "degraded"].includes((await health.json()).status));
    child.kill("SIGTERM");
    assert.equal(await exited, 0, stderr);
    assert.match(stderr, /shutting down/);
    assert.ok(existsSync(join(serveHome, "data", "kino.db")), "the job database is in $KINO_HOME/data");
  });
});
