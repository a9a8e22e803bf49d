/**
 * `kino bench-serve`: the spec (the default job where one request leaves the GPU underused), the real
 * engine tool run on the CPU with a scaled-down architecture (its worker started and spoken to over
 * the protocol), the report against issue 5's targets, its table and its record, and the checked-in
 * H100 record read back.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";
import { recordServeBench, runServeBench, serveBenchReport, serveBenchSpec, serveRecordName, type ServeBenchRaw } from "../src/api/serve-bench.ts";
import { formatServeBench } from "../src/cli/bench-serve.ts";
import { REPO_ROOT, resolveConfig } from "../src/config/config.ts";
import { runKino } from "./fixtures/cli.ts";
import { MINI_RUN, withMiniArchitecture } from "./fixtures/mini-spec.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const home = tempDir("kino-serve-bench-");
after(() => removeDir(home));
const provenance = { command: "kino bench-serve", commit: "abc123", dirty: false };
/** The serving figures measured on an H100 at c06db8f, before kino bench-serve existed. */
const H100_RECORD = join(REPO_ROOT, "docs/benchmarks/2026-11-22-h100-wan2.1-t2v-1.3b-serving-c06db8f.json");

test("spec: the 1.3B compiled and all resident at 320x192x17, 20 steps, one shape for both measurements", () => {
  const spec = serveBenchSpec({}, provenance);
  assert.equal(spec.model.name, "wan2.1-t2v-1.3b");
  assert.equal(spec.model.source.kind, "random");
  assert.deepEqual(spec.model.runtime, { cfg: "auto", attention: "auto", compile: true, cacheDir: null }, "compiled on cuda, as the GPU figures are taken");
  assert.equal(spec.model.memory?.textEncoder.kind, "resident", "a warm engine keeps its text encoder on the device");
  assert.deepEqual([spec.model.memory?.transformer.kind, spec.model.memory?.vae.kind, spec.model.memory?.vramBudget], ["resident", "resident", null]);
  const { job } = spec.ttfs;
  assert.deepEqual([job.width, job.height, job.frames, job.steps, job.guidance], [320, 192, 17, 20, 5]);
  assert.equal(spec.ttfs.runs, 5);
  assert.deepEqual(spec.throughput, [{ job, rounds: 2, batch: 2 }]);
  assert.equal(spec.warmupSteps, null, "by default the warm-ups run the job's steps");
  assert.deepEqual(spec.provenance, provenance);

  const named = serveBenchSpec({ size: "480x272", frames: 33, steps: 4, ttfsRuns: 3, rounds: 4, batch: 3, warmupSteps: 1, device: "cpu" }, provenance);
  assert.deepEqual([named.ttfs.job.width, named.ttfs.job.height, named.ttfs.job.frames, named.ttfs.job.steps, named.ttfs.runs], [480, 272, 33, 4, 3]);
  assert.deepEqual([named.throughput[0]!.rounds, named.throughput[0]!.batch, named.warmupSteps], [4, 3, 1]);
  assert.equal(named.model.runtime?.compile, false, "no compile by default on the CPU");
});

test("CLI: --spec-only carries the flags and the command; a bad flag is refused naming it", async () => {
  const r = await runKino(["bench-serve", "--batch", "3", "--ttfs-runs", "2", "--spec-only"], { home });
  assert.equal(r.code, 0, r.stderr);
  const spec = JSON.parse(r.stdout) as ReturnType<typeof serveBenchSpec>;
  assert.deepEqual([spec.throughput[0]!.batch, spec.ttfs.runs], [3, 2]);
  assert.equal(spec.provenance.command, "kino bench-serve --batch 3 --ttfs-runs 2 --spec-only");
  assert.equal(spec.model.runtime?.cacheDir, join(resolveConfig({ KINO_HOME: home, HOME: home }).cache, "runtime"), "kino's runtime cache");
  const one = await runKino(["bench-serve", "--batch", "1", "--spec-only"], { home });
  assert.equal(one.code, 2);
  assert.match(one.stderr, /--batch: /, "one job cannot be batched against itself");
  const frames = await runKino(["bench-serve", "--frames", "16", "--spec-only"], { home });
  assert.match(frames.stderr, /--frames: must be of the form 4k\+1/);
  const help = await runKino(["bench-serve", "--help"], { home });
  assert.match(help.stdout, /--size <WxH> +width x height, multiples of 16 \(default: 320x192\)/, "the help states this command's own default");
  assert.match(help.stdout, /leaves an H100 underused/, "the help says why the default is small");
});

let raw: ServeBenchRaw | undefined;

test("engine: the serving bench measures a real worker on the CPU; the figures agree with each other", async () => {
  const spec = withMiniArchitecture(serveBenchSpec({ ...MINI_RUN, ttfsRuns: 2, rounds: 1, cacheDir: home }, provenance));
  raw = await runServeBench(resolveConfig(process.env), spec);
  assert.deepEqual(raw.spec.provenance, provenance, "the spec comes back with the result");
  assert.deepEqual(raw.worker, { pid: raw.worker!.pid, exitStatus: 0 }, "the worker is shut down through the protocol");
  for (const kind of ["newPrompt", "cachedPrompt"] as const) {
    const f = raw.timeToFirstStep[kind];
    f.ttfsMs.values.forEach((ttfs, k) => {
      const total = f.requestMs.values[k]!;
      assert.ok(ttfs > 0 && ttfs < total && f.toDenoiseStartMs.values[k]! < total, `${kind}: the first step starts inside its request`);
    });
  }
  assert.deepEqual(raw.timeToFirstStep.newPrompt.promptCache, { hits: 2, misses: 2 }, "each new prompt runs the encoder once (its negative is cached)");
  assert.deepEqual(raw.timeToFirstStep.cachedPrompt.promptCache, { hits: 4, misses: 0 });
  const [c] = raw.throughput;
  assert.ok(c !== undefined && c.jobs === 2);
  assert.ok(Math.abs(c.throughputRatio - c.sequentialS.median / c.batchedS.median) < 1e-9, "the ratio is batched over sequential throughput");
  assert.equal(c.stepMs?.batched.values.length, spec.ttfs.job.steps, "one batched loop: its steps once");
  assert.equal(c.stepMs?.sequential.values.length, 2 * spec.ttfs.job.steps);
});

test("a report judges the targets, prints its tables, and is recorded once under a name that says what it measured", async () => {
  assert.ok(raw, "needs the previous test's result");
  const report = serveBenchReport(raw, new Date("2026-11-22T10:00:00Z"));
  assert.equal(report.kind, "kino-serving-bench/v1");
  assert.equal(report.targets.ttfsMs.newPrompt, raw.timeToFirstStep.newPrompt.ttfsMs.median);
  assert.equal(report.targets.throughputRatio.measured, raw.throughput[0]!.throughputRatio);
  const path = await recordServeBench(report, join(home, "benchmarks"));
  assert.match(path, /2026-11-22-cpu-wan2\.1-t2v-1\.3b-64x64x9-3steps-serving-abc123\.json$/);
  await assert.rejects(recordServeBench(report, join(home, "benchmarks")), /already exists: a recorded measurement is never replaced/);
  assert.deepEqual(JSON.parse(readFileSync(path, "utf8")), JSON.parse(JSON.stringify(report)));
  const table = formatServeBench(report);
  assert.match(table, /^new prompt \(text encoder runs\) +\d+\.\d ms +\d+\.\d ms–\d+\.\d ms +\d+\.\d ms +2 hits, 2 misses$/m);
  assert.match(table, /^batched \(one generate_batch\) +\d+\.\d\d s +\d+\.\d\d s–\d+\.\d\d s +\d+\.\d\d +\d+\.\d ms$/m);
  assert.match(table, /^sequential \(2 generates\) /m);

  const rawPath = join(home, "raw.json");
  writeFileSync(rawPath, JSON.stringify({ ok: true, result: raw }));
  const cli = await runKino(["bench-serve", "--from", rawPath, "--record", "recorded", "--json"], { home });
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal(JSON.parse(cli.stdout).kind, "kino-serving-bench/v1");
  assert.match(cli.stderr, /recorded .*recorded\/\d{4}-\d\d-\d\d-cpu-wan2\.1-t2v-1\.3b-64x64x9-3steps-serving-abc123\.json/);
});

test("the H100 record of c06db8f reads back: targets met at 320x192x17, not at 480x272x33", async () => {
  const r = await runKino(["bench-serve", "--from", H100_RECORD, "--json"], { home });
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout) as ReturnType<typeof serveBenchReport>;
  assert.equal(report.targets.ttfsMs.met, true);
  assert.ok(Math.abs(report.targets.ttfsMs.newPrompt - 57.27) < 0.01 && Math.abs(report.targets.ttfsMs.cachedPrompt - 28.11) < 0.01);
  assert.ok(report.targets.throughputRatio.met && Math.abs(report.targets.throughputRatio.measured! - 1.3666) < 1e-3, "the best case is the small one");
  assert.match(serveRecordName(report), /-h100-wan2\.1-t2v-1\.3b-320x192x17-20steps-serving-c06db8f\.json$/);
  assert.match(r.stderr, /^new prompt \(text encoder runs\) +57\.3 ms +54\.0 ms–66\.3 ms +38\.7 ms$/m, "no prompt-cache counts in that record");
  assert.match(r.stderr, /^target ≤ 250 ms: met$/m);
  assert.match(r.stderr, /throughput batched \/ sequential: 1\.37× \(target ≥ 1\.3×: met\)/);
  assert.match(r.stderr, /throughput batched \/ sequential: 1\.04× \(target ≥ 1\.3×: NOT met\)/);
  writeFileSync(join(home, "garbage.json"), '{"not": "a result"}');
  const bad = await runKino(["bench-serve", "--from", "garbage.json"], { home });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--from: .*garbage\.json is not a kino serving bench result/);
});
