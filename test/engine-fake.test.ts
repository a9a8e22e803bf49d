/** The FakeEngine passes the engine conformance suite, plus what only it can be asked (fake GPUs). */
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { FakeEngine } from "../src/engine/fake.ts";
import { engineConformance, rejectsWith } from "./engine-conformance.ts";
import { writeFakeCheckpoint } from "./fixtures/checkpoint.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

engineConformance("FakeEngine", async () => {
  const dir = tempDir("kino-fake-ckpt-");
  return {
    start: async () => new FakeEngine(),
    checkpoint: writeFakeCheckpoint(join(dir, "tiny")),
    job: { width: 64, height: 48, frames: 9, steps: 4 },
    cancelSteps: 50,
    cleanup: async () => removeDir(dir),
  };
});

test("FakeEngine: cuda without devices answers DEVICE_UNAVAILABLE; with a fake GPU it loads", async () => {
  const dir = tempDir();
  try {
    const ckpt = writeFakeCheckpoint(join(dir, "m"));
    const spec = { name: "m", source: { kind: "checkpoint" as const, path: ckpt }, device: "cuda" as const, dtype: "bfloat16" as const };
    const cpuOnly = new FakeEngine();
    const err = await rejectsWith(cpuOnly.load(spec), "DEVICE_UNAVAILABLE");
    assert.equal(err.field, "model.device");
    const gpu = { index: 0, name: "Fake H100", totalBytes: 80e9, freeBytes: 79e9, capability: "9.0" };
    const withGpu = new FakeEngine({ devices: [gpu] });
    assert.deepEqual((await withGpu.hello()).devices, [gpu]);
    assert.equal((await withGpu.load(spec)).device, "cuda");
  } finally {
    removeDir(dir);
  }
});
