/**
 * SubprocessEngine's supervision, against a stand-in worker that misbehaves on purpose: crashes carry
 * the stderr tail, malformed messages are INTERNAL errors, a silent worker is a stall (and the stall
 * timer restarts on every message), close kills a worker that ignores shutdown.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { SubprocessEngine } from "../src/engine/subprocess.ts";
import type { JobSpec } from "../src/protocol/engine.ts";
import { rejectsWith } from "./engine-conformance.ts";

const WORKER = fileURLToPath(new URL("./fixtures/stand-in-worker.js", import.meta.url));

function standIn(mode: string, options: { stallTimeoutMs?: number; shutdownGraceMs?: number } = {}): SubprocessEngine {
  return new SubprocessEngine({
    command: { command: process.execPath, args: [WORKER, mode], env: {} },
    stallTimeoutMs: options.stallTimeoutMs ?? 10_000,
    shutdownGraceMs: options.shutdownGraceMs ?? 2_000,
  });
}

const JOB: JobSpec = {
  prompt: "p",
  negativePrompt: "",
  width: 64,
  height: 64,
  frames: 5,
  steps: 2,
  guidance: 5,
  shift: null,
  seed: 0,
  fps: null,
  output: { video: "/tmp/never-written.mp4", framesDir: null },
};

test("a worker that dies mid-request fails it with ENGINE_CRASHED, its exit code and stderr tail", async () => {
  const engine = standIn("crash-on-generate");
  try {
    await engine.hello();
    const err = await rejectsWith(engine.generate(JOB), "ENGINE_CRASHED");
    assert.match(err.message, /exited with code 3 during generate/);
    assert.match(err.stderrTail ?? "", /RuntimeError: boom in the denoiser/);
    // The engine is dead: later requests fail the same way instead of hanging.
    await rejectsWith(engine.hello(), "ENGINE_CRASHED");
  } finally {
    await engine.close();
  }
});

test("a worker that dies mid-batch fails every job of the batch with ENGINE_CRASHED", async () => {
  const engine = standIn("crash-on-generate");
  try {
    const steps: number[] = [];
    const answers = engine.generateBatch([{ job: JOB, onEvent: (e) => e.kind === "step" && steps.push(e.i) }, { job: { ...JOB, seed: 1 } }]);
    for (const answer of answers) {
      const err = await rejectsWith(answer, "ENGINE_CRASHED");
      assert.match(err.message, /exited with code 3 during generate_batch, generate/);
      assert.match(err.stderrTail ?? "", /boom in the batched denoiser/);
    }
    assert.deepEqual(steps, [1], "the first job's events reached it before the crash");
  } finally {
    await engine.close();
  }
});

test("an engine that predates generate_batch fails each job with ENGINE_TOO_OLD and keeps serving", async () => {
  const engine = standIn("ok");
  try {
    const answers = engine.generateBatch([{ job: JOB }, { job: { ...JOB, seed: 1 } }]);
    for (const answer of answers) assert.match((await rejectsWith(answer, "ENGINE_TOO_OLD")).message, /generate_batch/);
    assert.equal((await engine.generate(JOB)).frames, 5, "a single generate still works");
  } finally {
    await engine.close();
  }
});

test("an engine error keeps its code and phase and carries the stderr tail", async () => {
  const engine = standIn("engine-error");
  try {
    const err = await rejectsWith(engine.generate(JOB), "OOM");
    assert.equal(err.phase, "denoise");
    assert.match(err.stderrTail ?? "", /CUDA out of memory/);
    assert.equal((await engine.hello()).engineVersion, "stand-in", "an engine error leaves the engine usable");
  } finally {
    await engine.close();
  }
});

for (const [mode, pattern] of [
  ["not-json", /not JSON/],
  ["bad-result", /hello result that fails the schema/],
] as const) {
  test(`a malformed message (${mode}) is an INTERNAL error and stops the worker`, async () => {
    const engine = standIn(mode);
    try {
      const err = await rejectsWith(engine.hello(), "INTERNAL");
      assert.match(err.message, pattern);
      await rejectsWith(engine.hello(), "INTERNAL");
    } finally {
      await engine.close();
    }
  });
}

test("a request the worker could not read (error with id ?) fails what is pending instead of hanging", async () => {
  const engine = standIn("unreadable");
  try {
    const err = await rejectsWith(engine.hello(), "BAD_REQUEST");
    assert.match(err.message, /line 1 is not JSON/);
  } finally {
    await engine.close();
  }
});

test("a worker speaking another protocol version is refused with UNSUPPORTED_PROTOCOL", async () => {
  const engine = standIn("wrong-protocol");
  try {
    await rejectsWith(engine.hello(), "UNSUPPORTED_PROTOCOL");
  } finally {
    await engine.close();
  }
});

test("the stall timer restarts on every message and fires when the worker goes silent", async () => {
  // 5 events 100 ms apart outlast a 300 ms timeout only if each one restarts it.
  const engine = standIn("stall", { stallTimeoutMs: 300 });
  const steps: number[] = [];
  const started = performance.now();
  try {
    const err = await rejectsWith(engine.generate(JOB, { onEvent: (e) => e.kind === "step" && steps.push(e.i) }), "ENGINE_STALLED");
    assert.deepEqual(steps, [1, 2, 3, 4, 5], "progress kept the job alive past the timeout");
    assert.ok(performance.now() - started >= 700, "it fired only after the silence");
    assert.match(err.message, /sent nothing for 0\.3 s during generate/);
  } finally {
    await engine.close();
  }
});

test("answers are routed by id and events to their own request", async () => {
  const engine = standIn("ok");
  try {
    const order: string[] = [];
    const steps: number[] = [];
    const generated = engine.generate(JOB, { onEvent: (e) => e.kind === "step" && steps.push(e.i) }).then((r) => {
      order.push("generate");
      return r;
    });
    const hello = engine.hello().then((h) => {
      order.push("hello");
      return h;
    });
    assert.equal((await hello).engineVersion, "stand-in");
    assert.equal((await generated).frames, 5);
    assert.deepEqual(order, ["hello", "generate"], "the later request was answered first and still matched");
    assert.deepEqual(steps, [1, 2]);
  } finally {
    await engine.close();
  }
});

test("close kills a worker that ignores shutdown, after the grace period; pending requests get ENGINE_CLOSED", async () => {
  const engine = standIn("ignore-shutdown", { shutdownGraceMs: 200 });
  await engine.hello();
  const pending = rejectsWith(engine.generate(JOB), "ENGINE_CLOSED");
  const started = performance.now();
  await engine.close();
  const took = performance.now() - started;
  assert.ok(took >= 200 && took < 5_000, `close waited the grace period, then killed (took ${took} ms)`);
  await pending;
  await rejectsWith(engine.hello(), "ENGINE_CLOSED");
});

test("a worker command that does not exist is ENGINE_UNAVAILABLE, not a hang", async () => {
  const engine = new SubprocessEngine({ command: { command: "/nonexistent/python", args: [], env: {} } });
  await rejectsWith(engine.hello(), "ENGINE_UNAVAILABLE");
  await engine.close();
});
