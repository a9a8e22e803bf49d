/**
 * `kino bench-memory` under a host RAM budget: the protocol's streamed source, the planner's disk plans in the spec, and the engine's
 * memory bench tool running one on the CPU (a scaled-down architecture: full size is for GPUs), the
 * transformer streamed from a scratch file exactly as resident.
 */
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { memoryBenchReport, memoryBenchSpec, runMemoryBench } from "../src/api/memory-bench.ts";
import { formatMemoryBench } from "../src/cli/bench-memory.ts";
import { resolveConfig } from "../src/config/config.ts";
import { GiB } from "../src/planner/hardware.ts";
import { MemorySpec } from "../src/protocol/engine.ts";
import { runKino } from "./fixtures/cli.ts";
import { MINI_RUN, withMiniArchitecture } from "./fixtures/mini-spec.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const home = tempDir("kino-memory-bench-");
after(() => removeDir(home));
const provenance = { command: "kino bench-memory", commit: "abc123", dirty: false };
const DISK_14B = { model: "wan2.1-t2v-14b", gpu: "h100-80gb", budgets: ["20GB"], ram: "8GB" };

test("spec: under --ram 8GB the 14B's budgets stream from disk; without it, from RAM", () => {
  const disk = memoryBenchSpec({ ...DISK_14B, resident: false }, provenance);
  const t = disk.cases[0]!.memory.transformer;
  assert.ok(t.kind === "streamed" && t.source === "disk", JSON.stringify(t));
  assert.ok(disk.cases[0]!.predicted!.peakRam <= 8 * GiB);
  const ram = memoryBenchSpec({ ...DISK_14B, ram: undefined, resident: false }, provenance);
  const r = ram.cases[0]!.memory.transformer;
  assert.ok(r.kind === "streamed" && r.source === "ram", JSON.stringify(r));
  assert.throws(() => memoryBenchSpec({ ...DISK_14B, ram: "8XB" }, provenance), (e: Error & { field?: string }) => e.field === "ram");
});

test("protocol: a streamed placement's source is ram or disk (absent: ram); anything else is refused naming the field", () => {
  const memory = { textEncoder: { kind: "resident" }, vae: { kind: "resident" }, vramBudget: null };
  const streamed = { kind: "streamed", residentBlocks: 0, prefetch: 1 };
  assert.ok(MemorySpec.safeParse({ ...memory, transformer: streamed }).success, "plans from before the field still parse");
  assert.ok(MemorySpec.safeParse({ ...memory, transformer: { ...streamed, source: "disk" } }).success);
  const bad = MemorySpec.safeParse({ ...memory, transformer: { ...streamed, source: "nvme" } });
  assert.ok(!bad.success);
  assert.deepEqual(bad.error.issues[0]!.path, ["transformer", "source"]);
});

test("CLI: --ram reaches the plans (--spec-only)", async () => {
  const r = await runKino(["bench-memory", "--model", "wan2.1-t2v-14b", "--budgets", "20GB", "--ram", "8GB", "--no-resident", "--spec-only"], { home });
  assert.equal(r.code, 0, r.stderr);
  const spec = JSON.parse(r.stdout) as ReturnType<typeof memoryBenchSpec>;
  assert.equal(spec.cases[0]!.memory.transformer.kind === "streamed" && spec.cases[0]!.memory.transformer.source, "disk");
});

test("engine: a disk case runs on the CPU, exactly as resident, its host RAM beside the prediction", async () => {
  const spec = withMiniArchitecture(memoryBenchSpec({ ...DISK_14B, ...MINI_RUN, timedSteps: 1, cacheDir: home }, provenance));
  const disk = spec.cases.find((c) => c.label === "20GB")!;
  assert.ok(disk.memory.transformer.kind === "streamed" && disk.memory.transformer.source === "disk");
  // The mini model has 2 blocks, the 14B 40: stream both of them.
  disk.memory.transformer.residentBlocks = 0;
  const raw = await runMemoryBench(resolveConfig(process.env), spec);
  const measured = raw.cases.find((c) => c.label === "20GB")!;
  assert.equal(measured.oom, null);
  assert.equal(measured.latentsMaxAbsDiffVsFirst, 0, "streaming from disk must not change the latents");
  const streamer = measured["streamer"] as { source: string; bytesRead: number; copies: number; blockBytes: number };
  assert.equal(streamer.source, "disk");
  // One block read per copy, the same bytes each time, at most the block's slot (which pads each tensor to 512 bytes).
  assert.ok(streamer.copies > 0 && streamer.bytesRead % streamer.copies === 0, JSON.stringify(streamer));
  assert.ok(streamer.bytesRead <= streamer.copies * streamer.blockBytes && streamer.bytesRead > 0.5 * streamer.copies * streamer.blockBytes);
  const report = memoryBenchReport(raw);
  const row = report.comparisons.find((c) => c.label === "20GB")!;
  assert.ok(row.peakRam.measured !== null && row.peakRam.predicted !== null && row.peakRam.ratio !== null);
  assert.match(formatMemoryBench(report), /20GB: te resident · transformer streamed from disk\(0 resident, prefetch 1\)/);
});
