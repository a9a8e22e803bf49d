/**
 * `kino profile`: the spec shared with bench, the real engine profile tool run on the CPU with a
 * scaled-down architecture, its trace and digest, and the table the CLI prints from it.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";
import { benchSpec } from "../src/api/bench.ts";
import { ProfileDigest, profileSpec, runProfile } from "../src/api/profile.ts";
import { formatProfileDigest } from "../src/cli/profile.ts";
import { resolveConfig } from "../src/config/config.ts";
import { runKino } from "./fixtures/cli.ts";
import { MINI_RUN, withMiniArchitecture } from "./fixtures/mini-spec.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const home = tempDir("kino-profile-");
after(() => removeDir(home));
const provenance = { command: "kino profile", commit: "abc123", dirty: false };

test("spec: the same model and job as bench, with its own warm-up", () => {
  const spec = profileSpec({ steps: 4 }, provenance);
  const bench = benchSpec({ steps: 4 }, provenance);
  const { runtime, ...model } = spec.model;
  assert.deepEqual([model, spec.job], [bench.model, bench.job], "profile must run what bench measures");
  assert.equal(spec.warmupSteps, 1);
  assert.deepEqual(runtime, { cfg: "auto", attention: "auto", compile: false, cacheDir: null }, "by default the eager hot path");
  const compiled = profileSpec({ steps: 4, compile: true, attention: "cudnn", cacheDir: "/tmp/k" }, provenance);
  assert.deepEqual(compiled.model.runtime, { cfg: "auto", attention: "cudnn", compile: true, cacheDir: "/tmp/k" }, "--compile/--attention must reach the engine");
});

test("the engine's profile tool: a valid Chrome trace and a digest with one row per step after the first", async () => {
  const spec = withMiniArchitecture(profileSpec(MINI_RUN, provenance));
  const trace = join(home, "trace.json");
  const raw = await runProfile(resolveConfig(process.env), spec, trace);
  const d = ProfileDigest.parse(raw.digest);
  assert.equal(raw.trace, trace);
  const events = (JSON.parse(readFileSync(trace, "utf8")) as { traceEvents: Array<{ name?: string }> }).traceEvents;
  assert.ok(events.some((e) => e.name === "kino/step 2"), "the trace carries kino's step ranges");
  assert.equal(d.stepsProfiled, spec.job.steps, "every denoising step must have its range");
  assert.deepEqual(d.steps.map((s) => s.step), [2, 3], "steps after the first, in order");
  assert.equal(d.device, "cpu");
  assert.deepEqual(
    [d.categories.gpuKernelMs, d.categories.memcpyMs, d.categories.gpuIdleMs, d.topKernels, d.steps[0]!.hostSyncs, d.steps[0]!.allocations],
    [null, null, null, null, null, null],
    "GPU-only fields are null on the CPU",
  );
  assert.ok(d.categories.cpuOpsMs > 0 && d.categories.cpuOpsMs <= d.categories.wallMs, "CPU op time lies within the wall time");
  const denoise = d.phasesMs.denoise ?? Infinity;
  assert.ok(d.steps.every((s) => s.ms > 0 && s.ms <= denoise), "a step lies within the denoising phase");
  assert.deepEqual(d.promptCache, { hits: 2, misses: 0 }, "after the warm-up both prompts come from the cache");

  const table = formatProfileDigest(raw);
  assert.match(table, /GPU kernels +—/);
  assert.match(table, /^3 steps profiled/m);
  assert.match(table, /^2 +\d+\.\d\d ms +— +\d+ +— +— +—$/m);
});

test("CLI: a bad job shape is refused naming the flag, before any engine runs", async () => {
  const r = await runKino(["profile", "--frames", "80", "--device", "cpu"], { home });
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--frames: must be of the form 4k\+1/);
});
