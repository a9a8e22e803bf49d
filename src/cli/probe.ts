/** `kino probe`: this machine's GPU measured for the planner (once; then from kino's cache), as a table or JSON. */
import { Command } from "commander";
import { probeMachine, type ProbeReport } from "../api/probe.ts";
import type { GemmMeasure } from "../protocol/engine.ts";
import type { CliContext } from "./context.ts";
import { bytes, seconds } from "./format.ts";

interface ProbeFlags {
  quick?: boolean;
  refresh?: boolean;
  json?: boolean;
}

export function probeCommand(ctx: CliContext): Command {
  return new Command("probe")
    .description("measure this machine's GPU for the planner: copies, GEMM and attention rates, memory (cached per GPU, driver, torch and host)")
    .option("--quick", "fewer repeats and smaller copies (about 2 s instead of 10 s)")
    .option("--refresh", "measure again, whatever the cache holds")
    .option("--json", "print the measurement and the planner's profile as one JSON object on stdout")
    .action(async (flags: ProbeFlags) => {
      const report = await probeMachine({ config: ctx.config, startEngine: ctx.startEngine, logger: ctx.logger }, { quick: flags.quick, refresh: flags.refresh });
      if (flags.json) {
        const { result, profile, cached, probedAt, path } = report;
        ctx.io.stdout(JSON.stringify({ ok: true, cached, probedAt, path, result, profile }) + "\n");
      } else {
        ctx.io.stdout(probeTable(report));
      }
    });
}

const rate = (bytesPerS: number | null) => (bytesPerS === null ? "—" : `${(bytesPerS / 1e9).toFixed(1)} GB/s`);
const tflops = (flopsPerS: number) => `${(flopsPerS / 1e12).toFixed(flopsPerS < 1e13 ? 2 : 0)} TFLOP/s`;
const shape = (g: GemmMeasure) => `${g.m}x${g.n}x${g.k}`;

/** The measurement as the CLI prints it: what was measured, then what the planner takes from it. */
export function probeTable(report: ProbeReport): string {
  const r = report.result;
  const where = r.device === "cuda" ? `cuda:${r.index}, compute ${r.capability}, driver ${r.driver ?? "?"}` : "no GPU: the host alone";
  const when = report.cached ? `from the cache, measured ${report.probedAt}` : `measured now in ${seconds(r.ms)}`;
  const rows: [string, string][] = [];
  if (r.vramTotalBytes !== null) rows.push(["VRAM", `${bytes(r.vramTotalBytes)} (${bytes(r.vramFreeBytes ?? 0)} free)`]);
  rows.push(["host RAM", `${bytes(r.hostRamBytes)} (${bytes(r.hostRamAvailableBytes)} available)${r.memoryLimitBytes === null ? "" : `; cgroup limit ${bytes(r.memoryLimitBytes)}`}`]);
  rows.push(["pinned cap", `${bytes(r.pinnedLimitBytes)} (half of the RAM; RLIMIT_MEMLOCK ${r.memlockBytes === null ? "unlimited" : bytes(r.memlockBytes)}, which CUDA's pinning is not charged to)`]);
  if (r.h2dBytesPerS !== null) {
    rows.push(["copies", `H2D ${rate(r.h2dBytesPerS)} pinned, ${rate(r.h2dPageableBytesPerS)} pageable; D2H ${rate(r.d2hBytesPerS)} (${bytes(r.transferBytes ?? 0)} each)`]);
  }
  if (r.gemm.length > 0) rows.push(["GEMM bf16", r.gemm.map((g) => `${shape(g)} ${tflops(g.flopsPerS)}`).join("; ")]);
  for (const a of r.attention) {
    const others = Object.entries(a.byBackend).filter(([name]) => name !== a.backend).map(([name, v]) => `${name} ${v === null ? "—" : tflops(v)}`);
    rows.push([r.attention.indexOf(a) === 0 ? "attention" : "", `${a.heads}x${a.tokens}x${a.headDim} ${a.backend} ${tflops(a.flopsPerS)}${others.length > 0 ? ` (${others.join(", ")})` : ""}`]);
  }
  rows.push(["CPU GEMM", `${shape(r.cpuGemm)} ${r.cpuGemm.dtype} ${tflops(r.cpuGemm.flopsPerS)} (${r.cpuThreads} threads)`]);
  if (r.diskReadBytesPerS !== undefined) {
    rows.push(["disk read", r.diskReadBytesPerS === null ? "— (the temporary folder is RAM-backed; the planner assumes its default)" : `${rate(r.diskReadBytesPerS)} sequential, past the page cache`]);
  }
  const p = report.profile;
  const planner = p === null
    ? "planner: nothing to plan on without a GPU (kino plan --gpu probe needs one)\n"
    : `planner: GEMM ${tflops(p.gemmFlops)}, attention ${tflops(p.attentionFlops)} (medians; kino plan takes the model's width), ` +
      `H2D ${rate(p.h2d)}, pinned ≤ ${bytes(p.pinnedLimit)}, disk ${rate(p.diskRead)}: kino plan --gpu probe\n`;
  return [
    `${r.name} (${where}; torch ${r.torch}) — ${when}${r.quick ? " (quick)" : ""}\n`,
    ...rows.map(([k, v]) => `  ${k.padEnd(11)} ${v}\n`),
    planner,
    `cache: ${report.path}\n`,
  ].join("");
}
