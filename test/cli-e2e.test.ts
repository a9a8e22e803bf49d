/**
 * End to end through the real `bin/kino`, the Python engine and the system's ffprobe, on CPU: a
 * fresh $KINO_HOME, where the tiny model is made on first use; the video and the frames checked;
 * a corrupt checkpoint refused with nothing written; Ctrl-C cancelling a running job.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { cpSync, existsSync, readdirSync, statSync, truncateSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { REPO_ROOT } from "../src/config/config.ts";
import { TINY_DEFAULTS } from "../src/catalog/models.ts";
import { probeVideo } from "../src/media/ffprobe.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const KINO = join(REPO_ROOT, "bin", "kino");

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs bin/kino with KINO_HOME set; `onStderr` may act on the output as it comes (e.g. send SIGINT). */
function kino(args: string[], home: string, onStderr?: (text: string, pid: number) => void): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(KINO, args, { cwd: home, env: { ...process.env, KINO_HOME: home }, stdio: ["ignore", "pipe", "pipe"] });
    const run: Run = { code: null, signal: null, stdout: "", stderr: "" };
    child.stdout.setEncoding("utf8").on("data", (t: string) => (run.stdout += t));
    child.stderr.setEncoding("utf8").on("data", (t: string) => {
      run.stderr += t;
      if (child.pid !== undefined) onStderr?.(run.stderr, child.pid);
    });
    child.once("error", reject);
    child.once("close", (code, signal) => resolve({ ...run, code, signal }));
  });
}

let home: string;
before(() => {
  home = tempDir("kino-e2e-");
});
after(() => removeDir(home));

// A broken engine must fail these tests, not hang them.
describe("bin/kino on the tiny model, CPU", { timeout: 180_000 }, () => {
  let first: Run;
  before(async () => {
    // The first run in a fresh home makes the tiny model, with the model's default job.
    first = await kino(["generate", "--model", "tiny", "--prompt", "a red fox in the snow", "--seed", "11", "--out", "fox.mp4", "--frames-dir", "fox-frames", "--json"], home);
  });

  test("generate finishes and prints one JSON object on stdout", () => {
    assert.equal(first.code, 0, first.stderr);
    const lines = first.stdout.trim().split("\n");
    assert.equal(lines.length, 1, `stdout holds only the JSON: ${first.stdout}`);
    const doc = JSON.parse(lines[0]!);
    assert.equal(doc.ok, true);
    assert.equal(doc.model.id, "tiny");
    assert.equal(doc.model.noise, true);
    assert.deepEqual([doc.device, doc.dtype], ["cpu", "float32"]);
    assert.deepEqual([doc.job.width, doc.job.height, doc.job.frames, doc.job.steps, doc.job.seed], [TINY_DEFAULTS.width, TINY_DEFAULTS.height, TINY_DEFAULTS.frames, TINY_DEFAULTS.steps, 11]);
    assert.equal(doc.result.output.video, join(home, "fox.mp4"));
    assert.ok(doc.timings.denoiseMs > 0 && doc.timings.wallMs >= doc.timings.totalMs);
  });

  test("it made the tiny model in $KINO_HOME/models/tiny and said the video is noise", () => {
    assert.ok(existsSync(join(home, "models", "tiny", "kino_tiny.json")));
    assert.match(first.stderr, /making kino's tiny model in/);
    assert.match(first.stderr, /random weights: the video is noise/);
  });

  test("the video is H.264 yuv420p at the job's size, frame count and rate", async () => {
    const probe = await probeVideo(join(home, "fox.mp4"));
    assert.equal(probe.codec, "h264");
    assert.equal(probe.pixFmt, "yuv420p");
    assert.deepEqual([probe.width, probe.height], [TINY_DEFAULTS.width, TINY_DEFAULTS.height]);
    assert.equal(probe.frames, TINY_DEFAULTS.frames);
    assert.equal(probe.fps, TINY_DEFAULTS.fps);
  });

  test("--frames-dir holds one PNG per frame", () => {
    const pngs = readdirSync(join(home, "fox-frames"));
    assert.equal(pngs.length, TINY_DEFAULTS.frames);
    assert.ok(pngs.every((f) => /^frame_\d{5}\.png$/.test(f)));
  });

  test("auto on a machine without a GPU picks tiny (already made) and prints a summary", async () => {
    const r = await kino(["generate", "--prompt", "a fox", "--size", "64x48", "--frames", "5", "--steps", "2", "--out", "auto.mp4"], home);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "");
    assert.match(r.stderr, /model auto → tiny: no CUDA GPU is present/);
    assert.doesNotMatch(r.stderr, /making kino's tiny model/);
    assert.match(r.stderr, /done in [\d.]+ s/);
    assert.match(r.stderr, /denoise [\d.]+ s \([\d.]+ s\/step × 2\)/);
    assert.equal((await probeVideo(join(home, "auto.mp4"))).frames, 5);
  });

  test("a truncated safetensors file: non-zero exit, the message names the file, no output left", async () => {
    const corrupt = join(home, "corrupt");
    cpSync(join(home, "models", "tiny"), corrupt, { recursive: true });
    const file = join(corrupt, "transformer", readdirSync(join(corrupt, "transformer")).find((f) => f.endsWith(".safetensors"))!);
    truncateSync(file, Math.floor(statSync(file).size / 3));
    const r = await kino(["generate", "--model", corrupt, "--prompt", "a fox", "--out", "corrupt.mp4"], home);
    assert.notEqual(r.code, 0);
    assert.equal(r.code, 2);
    assert.ok(r.stderr.includes(file), `the message names ${file}: ${r.stderr}`);
    assert.match(r.stderr, /\[BAD_CHECKPOINT\]/);
    assert.ok(!r.stderr.includes("    at "), "no stack trace without --debug");
    assert.equal(existsSync(join(home, "corrupt.mp4")), false);
    assert.deepEqual(readdirSync(home).filter((f) => f.includes("corrupt.mp4")), [], "no temporary file either");
  });

  test("Ctrl-C during denoising cancels the job: exit 130, no video", async () => {
    let sent = false;
    const r = await kino(["generate", "--model", "tiny", "--prompt", "a fox", "--size", "64x48", "--frames", "5", "--steps", "500", "--out", "interrupted.mp4"], home, (text, pid) => {
      if (!sent && /denoise step 1\//.test(text)) {
        sent = true;
        process.kill(pid, "SIGINT");
      }
    });
    assert.ok(sent, `the job reached its first step: ${r.stderr}`);
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stderr, /cancelling/);
    assert.doesNotMatch(r.stderr, /denoise step 500\//);
    assert.equal(existsSync(join(home, "interrupted.mp4")), false);
  });

  test("bad input exits 2 through the real binary, naming the flag", async () => {
    const r = await kino(["generate", "--prompt", "a fox", "--frames", "80", "--out", "x.mp4"], home);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^kino: --frames: .*nearest: 81/);
  });

  test("models make-tiny makes a checkpoint that generate accepts, and says it is noise", async () => {
    const r = await kino(["models", "make-tiny", "own-tiny", "--seed", "5", "--json"], home);
    assert.equal(r.code, 0, r.stderr);
    const doc = JSON.parse(r.stdout);
    assert.deepEqual([doc.ok, doc.path, doc.noise, doc.seed], [true, join(home, "own-tiny"), true, 5]);
    assert.match(r.stderr, /whatever it generates is noise/);
    assert.ok(existsSync(join(home, "own-tiny", "model_index.json")));
    assert.ok(existsSync(join(home, "own-tiny", "kino_tiny.json")));
  });

  test("quantize writes an INT8 copy that generate loads as written; an existing folder is refused", async () => {
    const q = await kino(["quantize", "own-tiny", "own-tiny-int8", "--mode", "int8", "--no-hash", "--json"], home);
    assert.equal(q.code, 0, q.stderr);
    const doc = JSON.parse(q.stdout) as { ok: boolean; mode: string; modules: number };
    assert.deepEqual([doc.ok, doc.mode], [true, "int8"]);
    assert.ok(doc.modules > 0, "some linears were quantized");
    assert.ok(existsSync(join(home, "own-tiny-int8", "transformer", "kino_quant.json")));
    const g = await kino(["generate", "--model", "own-tiny-int8", "--prompt", "a fox", "--size", "64x48", "--frames", "5", "--steps", "2", "--out", "q.mp4", "--json"], home);
    assert.equal(g.code, 0, g.stderr);
    assert.equal((await probeVideo(join(home, "q.mp4"))).frames, 5);
    const again = await kino(["quantize", "own-tiny", "own-tiny-int8", "--mode", "int8"], home);
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /already exists/);
  });

  test("models list --json shows tiny present", async () => {
    const r = await kino(["models", "list", "--json"], home);
    assert.equal(r.code, 0, r.stderr);
    const { models } = JSON.parse(r.stdout) as { models: { id: string; present: boolean }[] };
    assert.deepEqual(
      models.map((m) => [m.id, m.present]),
      [["tiny", true], ["wan2.1-t2v-1.3b", false], ["wan2.1-t2v-14b", false]],
    );
  });

  test("doctor --json reports the engine, torch, the H.264 encoder and ffprobe, and passes", async () => {
    const r = await kino(["doctor", "--json"], home);
    assert.equal(r.code, 0, r.stderr + r.stdout);
    const report = JSON.parse(r.stdout) as { ok: boolean; checks: { name: string; status: string }[] };
    assert.equal(report.ok, true);
    const status = Object.fromEntries(report.checks.map((c) => [c.name, c.status]));
    for (const name of ["node", "python env", "engine", "torch", "encoder", "ffmpeg", "ffprobe"]) assert.equal(status[name], "ok", name);
    assert.equal(status["model tiny"], "ok");
  });
});
