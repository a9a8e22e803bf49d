/** The job-shape flags that `generate` and `bench` share, and their parsing into numbers. */
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

/** Adds --size, --frames, --steps, --guidance, --shift and --seed (whose default each command states). */
export function addJobShapeOptions(command: Command, seedHelp: string): Command {
  return command
    .option("--size <WxH>", "width x height, multiples of 16 (default: the model's, 832x480)")
    .option("--frames <n>", "number of frames, 4k+1 (default: the model's, 81)")
    .option("--steps <n>", "denoising steps (default: the model's, 50)")
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
