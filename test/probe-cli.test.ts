/**
 * `kino probe` and `kino plan --gpu probe`: through the real bin/kino and the Python engine on the
 * CPU (a measurement of the host alone, cached in a fresh $KINO_CACHE), and in-process on a FakeEngine
 * that reports a GPU (what the lead sees on a GPU machine: the table, and a plan on the measured rates).
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { REPO_ROOT, resolveConfig } from "../src/config/config.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { GiB, RTX4090_24GB } from "../src/planner/hardware.ts";
import { ProbeResult } from "../src/protocol/engine.ts";
import { runKino } from "./fixtures/cli.ts";
import { probeLike } from "./fixtures/probe-result.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const KINO = join(REPO_ROOT, "bin", "kino");

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** bin/kino with a fresh home and probe cache, and this checkout's engine Python. */
function kino(args: string[], home: string): Promise<Run> {
  const env = { ...process.env, KINO_HOME: home, KINO_CACHE: join(home, "cache"), KINO_PYTHON: resolveConfig().python };
  return new Promise((resolve, reject) => {
    const child = spawn(KINO, args, { cwd: home, env, stdio: ["ignore", "pipe", "pipe"] });
    const run: Run = { code: null, stdout: "", stderr: "" };
    child.stdout.setEncoding("utf8").on("data", (t: string) => (run.stdout += t));
    child.stderr.setEncoding("utf8").on("data", (t: string) => (run.stderr += t));
    child.once("error", reject);
    child.once("close", (code) => resolve({ ...run, code }));
  });
}

let home: string;
before(() => {
  home = tempDir("kino-probe-cli-");
});
after(() => removeDir(home));

describe("bin/kino probe on the CPU engine", { timeout: 180_000 }, () => {
  test("--quick --json measures the host, caches it, and answers from the cache the second time", async () => {
    const first = await kino(["probe", "--quick", "--json"], home);
    assert.equal(first.code, 0, first.stderr);
    const doc = JSON.parse(first.stdout);
    assert.equal(doc.ok, true);
    assert.equal(doc.cached, false);
    ProbeResult.parse(doc.result);
    assert.equal(doc.result.device, "cpu");
    assert.equal(doc.profile, null, "no GPU: nothing for the planner");
    assert.ok(doc.path.startsWith(join(home, "cache", "probe")) && existsSync(doc.path), `the cache file lives in kino's cache folder: ${doc.path}`);
    const second = JSON.parse((await kino(["probe", "--quick", "--json"], home)).stdout);
    assert.equal(second.cached, true);
    assert.deepEqual(second.result, doc.result);
  });

  test("the table says what was measured and that there is nothing to plan on", async () => {
    const run = await kino(["probe", "--quick"], home);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /no GPU: the host alone/);
    assert.match(run.stdout, /CPU GEMM\s+256x2048x2048 bfloat16 [0-9.]+ TFLOP\/s/);
    assert.match(run.stdout, /pinned cap\s+[0-9.]+ GiB \(half of the RAM; RLIMIT_MEMLOCK/);
    assert.match(run.stdout, /disk read\s+([0-9.]+ GB\/s sequential, past the page cache|— \(the temporary folder is RAM-backed)/);
    assert.match(run.stdout, /from the cache/);
  });

  test("plan --gpu probe without a GPU is refused naming --gpu (exit 2)", async () => {
    const run = await kino(["plan", "--gpu", "probe", "--json"], home);
    assert.equal(run.code, 2, run.stderr);
    assert.equal(JSON.parse(run.stdout).error.code, "DEVICE_UNAVAILABLE");
    assert.match(run.stderr, /--gpu: the probe measured no GPU/);
  });
});

describe("kino probe and plan --gpu probe on an engine with a GPU (FakeEngine)", () => {
  // A 4090-like card behind a slow 8 GB/s link.
  const measured = probeLike(RTX4090_24GB, { name: "NVIDIA GeForce RTX 4090", h2dBytesPerS: 8e9, d2hBytesPerS: 8e9, h2dPageableBytesPerS: 2.7e9, diskReadBytesPerS: 1.8e9 });
  const device = { index: 0, name: measured.name, totalBytes: measured.vramTotalBytes!, freeBytes: measured.vramFreeBytes!, capability: "8.9" };
  const engine = () => new FakeEngine({ devices: [device], probe: measured });
  // The probe cache under the test's home, never the user's.
  const options = (dir: string) => ({ home: dir, engine, config: { cache: join(dir, "cache") } });

  test("kino probe prints the copies, GEMMs, attention and the planner's profile", async () => {
    const dir = tempDir("kino-probe-gpu-");
    try {
      const run = await runKino(["probe"], options(dir));
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, /^NVIDIA GeForce RTX 4090 \(cuda:0, compute 9\.0, driver 550\.54\.15; torch 2\.11\.0\) — measured now/);
      assert.match(run.stdout, /copies\s+H2D 8\.0 GB\/s pinned, 2\.7 GB\/s pageable; D2H 8\.0 GB\/s \(1\.0 GiB each\)/);
      assert.match(run.stdout, /GEMM bf16\s+32760x1536x1536 165 TFLOP\/s; 32760x5120x5120 165 TFLOP\/s/);
      assert.match(run.stdout, /attention\s+12x32760x128 cudnn 150 TFLOP\/s \(flash —, efficient 75 TFLOP\/s\)/);
      assert.match(run.stdout, /disk read\s+1\.8 GB\/s sequential/);
      assert.match(run.stdout, /planner: GEMM 165 TFLOP\/s, attention 150 TFLOP\/s .*H2D 8\.0 GB\/s, pinned ≤ [0-9.]+ GiB, disk 1\.8 GB\/s/);
      assert.match(run.stdout, new RegExp(`cache: ${join(dir, "cache", "probe")}/nvidia-geforce-rtx-4090-[0-9a-f]{12}\\.json`));
      const again = await runKino(["probe", "--json"], options(dir));
      assert.equal(JSON.parse(again.stdout).cached, true, "the second run reads the cache");
      assert.equal(JSON.parse(again.stdout).profile.h2d, 8e9);
    } finally {
      removeDir(dir);
    }
  });

  test("plan --gpu probe plans on the measured profile: the slow link costs a short 14B clip time against the preset", async () => {
    const dir = tempDir("kino-plan-probe-");
    try {
      const args = ["plan", "--model", "wan2.1-t2v-14b", "--size", "256x256", "--frames", "5", "--steps", "8", "--vram", "20GB", "--json"];
      const probed = await runKino([...args, "--gpu", "probe"], options(dir));
      assert.equal(probed.code, 0, probed.stderr);
      const preset = await runKino([...args, "--gpu", "rtx4090-24gb"], options(dir));
      const p = JSON.parse(probed.stdout).plan;
      const q = JSON.parse(preset.stdout).plan;
      assert.equal(p.hardware, "NVIDIA GeForce RTX 4090 (measured)");
      assert.equal(p.budget.vram, 20 * GiB);
      assert.ok(p.predicted.seconds > q.predicted.seconds, `8 GB/s (${p.predicted.seconds.toFixed(1)} s) against the preset's 25 GB/s (${q.predicted.seconds.toFixed(1)} s)`);
      assert.equal(preset.starts, 0, "a named profile needs no engine");
      assert.equal(probed.starts, 1, "the probe started one engine (hello, then the measurement)");
    } finally {
      removeDir(dir);
    }
  });
});
