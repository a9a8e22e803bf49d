/**
 * `kino bench`: the spec built from the catalog, the real engine bench tool run on the CPU with a
 * scaled-down architecture (the full-size ones are for GPUs), and the report recorded from it.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";
import { benchReport, benchSpec, readRaw, recordBench, runBench, type BenchRaw } from "../src/api/bench.ts";
import { formatBenchSummary } from "../src/cli/bench.ts";
import { resolveConfig } from "../src/config/config.ts";
import { KinoError } from "../src/errors.ts";
import { runKino } from "./fixtures/cli.ts";
import { MINI_RUN, withMiniArchitecture } from "./fixtures/mini-spec.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const home = tempDir("kino-bench-");
after(() => removeDir(home));
const provenance = { command: "kino bench", commit: "abc123", dirty: false };

test("spec: the 1.3B architecture with random weights and Wan's 480p defaults", () => {
  const spec = benchSpec({}, provenance);
  assert.equal(spec.model.name, "wan2.1-t2v-1.3b");
  assert.equal(spec.model.source.kind, "random");
  assert.equal(spec.model.dtype, "bfloat16");
  assert.deepEqual(
    [spec.job.width, spec.job.height, spec.job.frames, spec.job.steps, spec.job.guidance, spec.job.shift],
    [832, 480, 81, 50, 5, 3],
  );
  assert.deepEqual(spec.references, ["diffusers", "diffusers-compiled"], "on cuda both references by default");
  assert.deepEqual(spec.kinoRuntime, { cfg: "batched", attention: "auto", compile: true }, "auto: the planner's choice for an H100");
  assert.deepEqual(spec.provenance, provenance, "a result measured elsewhere must still say which command and commit made it");
  const big = benchSpec({ model: "wan2.1-t2v-14b", size: "1280x720", reference: false }, provenance);
  assert.equal(big.model.source.kind === "random" && big.model.source.architecture.transformer.num_layers, 40);
  assert.deepEqual([big.job.width, big.job.height, big.references], [1280, 720, ["diffusers-compiled"]]);
  assert.equal(big.kinoRuntime.cfg, "sequential", "the 14B at 720p saturates the GPU with one sample: two forwards per step");
  assert.equal(benchSpec({ cfg: "batched", model: "wan2.1-t2v-14b" }, provenance).kinoRuntime.cfg, "batched", "a named mode is kept");
  assert.equal(benchSpec({ guidance: 1 }, provenance).kinoRuntime.cfg, "auto", "no guidance: nothing to batch");
  const cpu = benchSpec({ device: "cpu", compile: false }, provenance);
  assert.deepEqual([cpu.references, cpu.kinoRuntime.compile], [["diffusers"], false], "no compiled reference or compile by default on the CPU");
});

test("spec: bad requests name the field", () => {
  const cases: Array<[Parameters<typeof benchSpec>[0], string, RegExp]> = [
    [{ model: "wan9" }, "model", /not in the catalog; known: tiny, wan2\.1-t2v-1\.3b/],
    [{ model: "tiny" }, "model", /no full-size architecture/],
    [{ size: "830x480" }, "size", /multiple of 16/],
    [{ frames: 80 }, "frames", /4k\+1/],
  ];
  for (const [options, field, message] of cases) {
    assert.throws(
      () => benchSpec(options, provenance),
      (err: unknown) => err instanceof KinoError && err.field === field && message.test(err.message),
      `${JSON.stringify(options)} should be refused naming ${field}`,
    );
  }
});

/** The bench spec of a 2-layer stand-in of Wan's architecture (see fixtures/mini-spec.ts). */
function miniSpec() {
  return withMiniArchitecture(benchSpec(MINI_RUN, provenance));
}

let raw: BenchRaw | undefined;

test("the engine's bench tool measures kino and diffusers on the same components", async () => {
  const spec = miniSpec();
  raw = await runBench(resolveConfig(process.env), spec);
  const kino = raw.runs.kino[0]!;
  const diffusers = raw.runs.diffusers?.[0];
  assert.ok(diffusers, "the reference run is missing");
  // CFG (guidance 5): kino runs one batch-2 forward per step, diffusers two of batch 1; a probe that
  // missed forwards or counted the warm-up would break these counts.
  assert.deepEqual([kino.forward.n, kino.forwardBatch], [spec.job.steps, 2]);
  assert.deepEqual([diffusers.forward.n, diffusers.forwardBatch], [2 * spec.job.steps, 1]);
  assert.equal(kino.step.n, spec.job.steps);
  assert.equal(diffusers.step.n, spec.job.steps);
  assert.ok(kino.wallS >= (kino.phasesS.denoise ?? Infinity), "a generation cannot take less than its denoising");
  const f = raw.summary.forwardS;
  assert.ok(f.kino !== null && f.diffusers !== null && f.ratio !== null);
  assert.ok(Math.abs(f.ratio - f.kino / f.diffusers) < 1e-9, "the ratio is kino / diffusers");
  assert.ok(Math.abs(f.kino - kino.forward.medianS! / 2) < 1e-12, "a batch-2 forward counts as two of batch 1");
  assert.equal(raw.summary.peakVramBytes.kino, null, "no VRAM on the CPU");
  assert.equal(raw.videoTokens, 3 * 4 * 4, "64x64x9 → latents 3×8×8 → patches 3×4×4");
  assert.deepEqual(raw.spec.provenance, provenance);
});

test("a report is recorded with its provenance, and read back from a raw file", async () => {
  assert.ok(raw, "needs the previous test's result");
  const report = benchReport(raw, new Date("2026-11-22T10:00:00Z"));
  const path = await recordBench(report, join(home, "benchmarks"));
  assert.match(path, /2026-11-22-cpu-wan2\.1-t2v-1\.3b-64x64x9-3steps-abc123\.json$/);
  await assert.rejects(recordBench(report, join(home, "benchmarks")), /already exists: a recorded measurement is never replaced/);
  assert.deepEqual(JSON.parse(readFileSync(path, "utf8")), JSON.parse(JSON.stringify(report)));
  const table = formatBenchSummary(report);
  assert.match(table, /per forward, batch 1 \(median\) +\d+\.\d{3} s +\d+\.\d{3} s +— +\d+\.\d{3}× +—/);
  assert.match(table, /peak VRAM +— +— +— +— +—/);

  const rawPath = join(home, "raw.json");
  writeFileSync(rawPath, JSON.stringify({ ok: true, result: raw }));
  assert.deepEqual(await readRaw(rawPath), raw);
  const cli = await runKino(["bench", "--from", rawPath, "--record", "recorded", "--json"], { home });
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal(JSON.parse(cli.stdout).kind, "kino-bench/v1");
  assert.match(cli.stderr, /recorded .*recorded\/\d{4}-\d\d-\d\d-cpu-wan2\.1-t2v-1\.3b-64x64x9-3steps-abc123\.json/);
});

test("CLI: --spec-only prints the spec with the command; a bad --from names the flag", async () => {
  const spec = await runKino(["bench", "--steps", "7", "--spec-only"], { home });
  assert.equal(spec.code, 0, spec.stderr);
  const parsed = JSON.parse(spec.stdout);
  assert.equal(parsed.job.steps, 7);
  assert.equal(parsed.provenance.command, "kino bench --steps 7 --spec-only");
  writeFileSync(join(home, "garbage.json"), '{"not": "a result"}');
  const bad = await runKino(["bench", "--from", "garbage.json"], { home });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--from: .*garbage\.json is not a kino bench result/);
});
