/**
 * The Python worker (SubprocessEngine over kino_engine.worker) passes the engine conformance suite on
 * a tiny checkpoint made once for this file, and dies loudly rather than hanging when it is killed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { resolveConfig } from "../src/config/config.ts";
import { SubprocessEngine } from "../src/engine/subprocess.ts";
import { makeTinyCheckpoint } from "../src/engine/tools.ts";
import { engineConformance, rejectsWith } from "./engine-conformance.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const config = resolveConfig(process.env, { stallTimeoutMs: 120_000 });
const home = tempDir("kino-subprocess-");
const checkpoint = join(home, "tiny");
const made = makeTinyCheckpoint(config, checkpoint, 3);
const JOB = { width: 64, height: 48, frames: 9, steps: 4 };

engineConformance("SubprocessEngine (Python worker)", async () => {
  await made;
  return {
    start: () => SubprocessEngine.start(config),
    checkpoint,
    job: JOB,
    cancelSteps: 400,
    cleanup: async () => {},
  };
});

let killed: SubprocessEngine;
before(async () => {
  await made;
  killed = await SubprocessEngine.start(config);
});
after(async () => {
  await killed?.close();
  removeDir(home);
});

test("SIGKILL of the worker mid-job fails the job with ENGINE_CRASHED and the stderr tail, not a hang", { timeout: 120_000 }, async () => {
  await killed.load({ name: "tiny", source: { kind: "checkpoint", path: checkpoint }, device: "cpu", dtype: "float32" });
  const job = {
    prompt: "p",
    negativePrompt: "",
    ...JOB,
    steps: 1000,
    guidance: 5,
    shift: null,
    seed: 1,
    fps: null,
    output: { video: join(home, "killed.mp4"), framesDir: null },
  };
  const started = performance.now();
  const err = await rejectsWith(
    killed.generate(job, {
      onEvent: (e) => {
        if (e.kind === "step" && e.i === 1 && killed.pid !== undefined) process.kill(killed.pid, "SIGKILL");
      },
    }),
    "ENGINE_CRASHED",
  );
  assert.match(err.message, /killed by SIGKILL during generate/);
  assert.ok((err.stderrTail ?? "").length > 0, "the worker logs to stderr, so there is a tail to show");
  assert.equal(err.stderrTail, killed.stderrTail, "the error carries what the worker last wrote to stderr");
  assert.ok(performance.now() - started < 60_000, "the crash is noticed at once");
  await rejectsWith(killed.hello(), "ENGINE_CRASHED");
});
