/**
 * `kino quantize SRC DST --mode fp8`: writes kino's pre-quantized checkpoint of a diffusers Wan folder
 * (the transformer's block linears in a low-bit mode, scales, a manifest; the other components linked
 * or copied), streaming the bf16 shards through the engine so the whole model never sits in host RAM.
 * `kino generate --model DST` then loads it as written. The engine's `kino_engine.quant` tool does the work.
 */
import { resolve } from "node:path";
import { Command, Option } from "commander";
import { runEngineTool } from "../engine/tools.ts";
import { KinoError } from "../errors.ts";
import type { CliContext } from "./context.ts";

const MODES = ["fp8", "fp8-weight", "int8", "int8-dynamic"] as const;

interface QuantizeFlags {
  mode: (typeof MODES)[number];
  device: "cpu" | "cuda";
  hash: boolean;
  json?: boolean;
}

export function quantizeCommand(ctx: CliContext): Command {
  return new Command("quantize")
    .description("write a pre-quantized copy of a Wan checkpoint (the transformer's linears in FP8 or INT8; lossy, see docs/benchmarks.md)")
    .argument("<src>", "a diffusers Wan checkpoint folder (or its transformer folder)")
    .argument("<dst>", "the new folder to write (must not exist)")
    .addOption(new Option("--mode <mode>", "the low-bit format of the linears").choices([...MODES]).makeOptionMandatory())
    .addOption(new Option("--device <device>", "where tensors are quantized as they stream in").choices(["cpu", "cuda"]).default("cpu"))
    .option("--no-hash", "do not record the source files' sha256 in the manifest (faster)")
    .option("--json", "print the result as one JSON object on stdout")
    .action(async (src: string, dst: string, flags: QuantizeFlags) => {
      const args = ["quantize", resolve(ctx.cwd, src), resolve(ctx.cwd, dst), "--mode", flags.mode, "--device", flags.device];
      if (!flags.hash) args.push("--no-hash");
      ctx.io.stderr(`kino: quantizing ${src} to ${flags.mode} (lossy) into ${dst}\n`);
      const answer = await runEngineTool(ctx.config, args, { module: "kino_engine.quant", signal: ctx.signal, logger: ctx.logger });
      const result = answer.result as Record<string, unknown> | undefined;
      if (result === undefined) throw new KinoError("TOOL_FAILED", "kino_engine.quant quantize answered without a result");
      ctx.io.stdout(
        flags.json
          ? JSON.stringify({ ok: true, ...result }) + "\n"
          : `${String(result.path)}: ${String(result.modules)} linears in ${String(result.mode)}, ${(Number(result.bytes) / 2 ** 30).toFixed(2)} GiB, ${String(result.seconds)} s\n`,
      );
    });
}
