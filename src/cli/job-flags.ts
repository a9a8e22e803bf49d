/** The flags that `generate`, `bench` and `profile` share, and their parsing into numbers. */
import type { Command } from "commander";
import { integerFlag, numberFlag } from "./flags.ts";

export interface JobShapeFlags {
  size?: string;
  frames?: string;
  steps?: string;
  guidance?: string;
  shift?: string;
  seed?: string;
}

export interface JobShape {
  size: string | undefined;
  frames: number | undefined;
  steps: number | undefined;
  guidance: number | undefined;
  shift: number | undefined;
  seed: number | undefined;
}

/** What the help of --size, --frames and --steps says their default is. */
export interface ShapeDefaults {
  readonly size: string;
  readonly frames: string;
  readonly steps: string;
}

/** The model's own defaults (Wan 2.1 at 480p). */
export const MODEL_SHAPE_DEFAULTS: ShapeDefaults = { size: "the model's, 832x480", frames: "the model's, 81", steps: "the model's, 50" };

/** Adds --size, --frames, --steps, --guidance, --shift and --seed (whose default each command states). */
export function addJobShapeOptions(command: Command, seedHelp: string, defaults: ShapeDefaults = MODEL_SHAPE_DEFAULTS): Command {
  return command
    .option("--size <WxH>", `width x height, multiples of 16 (default: ${defaults.size})`)
    .option("--frames <n>", `number of frames, 4k+1 (default: ${defaults.frames})`)
    .option("--steps <n>", `denoising steps (default: ${defaults.steps})`)
    .option("--guidance <x>", "classifier-free guidance scale, 0 for none (default 5)")
    .option("--shift <x>", "flow shift of the scheduler (default 3, for 480p)")
    .option("--seed <n>", seedHelp);
}

/** The flags as numbers, or an INVALID_ARGUMENT naming the flag. */
export function jobShape(flags: JobShapeFlags): JobShape {
  return {
    size: flags.size,
    frames: integerFlag(flags.frames, "frames"),
    steps: integerFlag(flags.steps, "steps"),
    guidance: numberFlag(flags.guidance, "guidance"),
    shift: numberFlag(flags.shift, "shift"),
    seed: integerFlag(flags.seed, "seed"),
  };
}

/** The flags of a random-weight run (`bench`, `profile`): the job shape plus model, prompt, device, dtype. */
export interface RandomRunFlags extends JobShapeFlags {
  model?: string;
  prompt?: string;
  device?: "cuda" | "cpu";
  dtype?: "bf16" | "fp16" | "fp32";
  warmupSteps?: string;
}

/**
 * Adds --model (a catalog architecture), the job shape, --prompt, --device, --dtype and --warmup-steps
 * (`warmupDefault` undefined: the command's own default, which `warmupHelp` states).
 */
export function addRandomRunOptions(command: Command, warmupHelp: string, warmupDefault: string | undefined, shape?: ShapeDefaults): Command {
  command.option("--model <id>", "a catalog id with an architecture (random weights)", "wan2.1-t2v-1.3b");
  return addJobShapeOptions(command, "random seed (default 42)", shape)
    .option("--prompt <text>", "prompt")
    .option("--device <device>", "cuda or cpu", "cuda")
    .option("--dtype <dtype>", "bf16, fp16 or fp32", "bf16")
    .option("--warmup-steps <n>", warmupHelp, warmupDefault);
}

/** The random-run flags as options, or an INVALID_ARGUMENT naming the flag. */
export function randomRun(flags: RandomRunFlags) {
  return {
    model: flags.model,
    ...jobShape(flags),
    prompt: flags.prompt,
    device: flags.device,
    dtype: flags.dtype,
    warmupSteps: integerFlag(flags.warmupSteps, "warmupSteps"),
  };
}

/** The command line as typed after `kino`, for a record's provenance. */
export function commandLine(argv: readonly string[], name: string): string {
  return ["kino", name, ...argv.slice(argv.indexOf(name) + 1)].join(" ");
}
