/** `kino plan`: the plan for a request on a GPU under a budget, as a table or JSON; no weights, and no engine but for `--gpu probe`. */
import { Command } from "commander";
import { planModelOrFolder, type PlanResult } from "../api/plan.ts";
import { probeMachine } from "../api/probe.ts";
import { withWeights } from "../planner/manifest.ts";
import { GiB } from "../planner/hardware.ts";
import { describeDecode, describePlacement, PLAN_PHASES, type PlanPhase } from "../planner/plan.ts";
import type { CliContext } from "./context.ts";
import { integerFlag, numberFlag } from "./flags.ts";

interface PlanFlags {
  model?: string;
  size?: string;
  frames?: string;
  steps?: string;
  guidance?: string;
  vram?: string;
  ram?: string;
  memoryLevel?: string;
  precision?: string;
  gpu?: string;
  json?: boolean;
}

export function planCommand(ctx: CliContext): Command {
  return new Command("plan")
    .description("show where each component would live, and the predicted peak memory and time (no weights needed)")
    .option("--model <id|path>", "a catalog id with an architecture, or a diffusers Wan checkpoint folder (its configs are read, not its weights)", "wan2.1-t2v-1.3b")
    .option("--size <WxH>", "width x height, multiples of 16 (default: the model's, 832x480)")
    .option("--frames <n>", "number of frames, 4k+1 (default: the model's, 81)")
    .option("--steps <n>", "denoising steps (default: the model's, 50)")
    .option("--guidance <x>", "classifier-free guidance scale, 0 for none (default 5)")
    .option("--vram <size>", "VRAM budget, e.g. 12GB (GB = GiB; default: the GPU's free VRAM)")
    .option("--ram <size>", "host RAM budget, e.g. 32GB (default: the machine's)")
    .option("--memory-level <level>", "0 all resident, 1 VAE tiled, 2 + text encoder on CPU, 3 + transformer streamed, or auto", "auto")
    .option("--precision <mode>", "the transformer's linears: exact, fp8, fp8-weight, int8, int8-dynamic, or auto (exact unless it does not fit)")
    .option("--gpu <profile>", "hardware profile: h100-80gb, rtx4090-24gb, or probe (this machine's GPU as kino probe measured it; measured now if not cached)", "h100-80gb")
    .option("--json", "print the plan as one JSON object on stdout")
    .action(async (flags: PlanFlags) => {
      const probe = flags.gpu === "probe" ? (await probeMachine({ config: ctx.config, startEngine: ctx.startEngine, logger: ctx.logger })).result : undefined;
      const result = await planModelOrFolder({
        model: flags.model,
        size: flags.size,
        frames: integerFlag(flags.frames, "frames"),
        steps: integerFlag(flags.steps, "steps"),
        guidance: numberFlag(flags.guidance, "guidance"),
        vram: flags.vram,
        ram: flags.ram,
        memoryLevel: flags.memoryLevel,
        precision: flags.precision,
        gpu: flags.gpu,
        probe,
      }, ctx.cwd);
      ctx.io.stdout(flags.json ? JSON.stringify({ ok: true, plan: result.plan }) + "\n" : planTable(result));
    });
}

const gib = (bytes: number) => `${(bytes / GiB).toFixed(1)} GiB`;
const secs = (s: number) => (s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`);
const PHASE_NAMES: Readonly<Record<PlanPhase, string>> = { textEncode: "text encode", denoise: "denoise", decode: "VAE decode" };

/** The plan as the CLI prints it: placements, then phases, then the reasons. */
export function planTable({ plan: p, manifest: exact }: PlanResult): string {
  const m = withWeights(exact, p.weights); // the transformer's bytes as the plan stores them
  const r = p.request;
  const rows = (table: string[][]) => {
    const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
    return table.map((row) => row.map((cell, i) => cell.padEnd(widths[i]!)).join("  ").trimEnd()).join("\n") + "\n";
  };
  const layers = m.transformer.shape.layers;
  return [
    `${p.model} ${r.width}x${r.height}x${r.frames}, ${r.steps} steps, guidance ${r.guidance} on ${p.hardware}` +
      ` (VRAM ${gib(p.budget.vram)}, ${gib(p.budget.usableVram)} usable; RAM ${gib(p.budget.ram)}; memory level ${p.memoryLevel})\n\n`,
    rows([
      ["component", "weights", "placement"],
      ["text encoder", gib(m.textEncoder.bytes), describePlacement(p.placement.textEncoder)],
      ["transformer", gib(m.transformer.bytes), describePlacement(p.placement.transformer, layers)],
      ["VAE", gib(m.vae.bytes), describePlacement(p.placement.vae)],
      ["CFG", "", p.cfg],
      ["VAE decode", "", describeDecode(p.vaeDecode)],
    ]),
    "\n",
    rows([
      ["phase", "peak VRAM", "time"],
      ...PLAN_PHASES.map((ph) => [PHASE_NAMES[ph], gib(p.predicted.phases[ph].vram), secs(p.predicted.phases[ph].seconds)]),
      ["total", gib(p.predicted.peakVram), `${secs(p.predicted.seconds)} (${secs(p.predicted.secondsPerStep)} per step)`],
    ]),
    `peak host RAM ${gib(p.predicted.peakRam)} (pinned ${gib(p.pinnedBytes)}); at most ${gib(p.residentBytes)} of weights on the device\n\n`,
    "why:\n",
    ...p.reasons.map((line) => `  - ${line}\n`),
  ].join("");
}
