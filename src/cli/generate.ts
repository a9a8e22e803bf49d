/** `kino generate`: flags → GenerateOptions → generateVideo, with progress and a closing summary. */
import { Command, Option } from "commander";
import { generateVideo, type GenerateOutcome } from "../api/generate.ts";
import type { GenerateOptions } from "../api/generate-options.ts";
import type { CliContext } from "./context.ts";
import { integerFlag, numberFlag } from "./flags.ts";
import { bytes, seconds } from "./format.ts";
import { addJobShapeOptions, jobShape, type JobShapeFlags } from "./job-flags.ts";
import { ProgressReporter } from "./progress.ts";

interface GenerateFlags extends JobShapeFlags {
  model: string;
  prompt: string;
  negativePrompt?: string;
  fps?: string;
  device?: "cuda" | "cpu";
  dtype?: "bf16" | "fp16" | "fp32";
  randomWeights?: boolean;
  compile?: boolean;
  vram?: string;
  ram?: string;
  memoryLevel?: string;
  precision?: string;
  framesDir?: string;
  preview?: string;
  previewEvery?: string;
  out: string;
  json?: boolean;
}

export function generateCommand(ctx: CliContext): Command {
  const command = new Command("generate")
    .description("generate a video from a text prompt")
    .option("--model <id|path>", "a catalog id (kino models list), a checkpoint folder, or auto: the 1.3B model on a GPU when downloaded, else tiny", "auto")
    .requiredOption("--prompt <text>", "what the video shows")
    .option("--negative-prompt <text>", "what it should not show (default: the model's; Wan's standard one)");
  return addJobShapeOptions(command, "random seed (default: random, printed)")
    .option("--fps <n>", "frames per second of the video (default: the model's, 16)")
    .addOption(new Option("--device <device>", "where to run (default: cuda if there is a GPU)").choices(["cuda", "cpu"]))
    .addOption(new Option("--dtype <dtype>", "precision (default: bf16 on cuda, fp32 on cpu)").choices(["bf16", "fp16", "fp32"]))
    .option("--compile", "compile the transformer's blocks (torch.compile; the kernels are cached on disk): the first job pays for it")
    .option("--vram <size>", "VRAM budget, e.g. 12GB: the planner keeps the run under it (default: the GPU's free memory)")
    .option("--ram <size>", "host RAM budget, e.g. 32GB (default: the machine's)")
    .option("--memory-level <level>", "0 all resident … 3 transformer streamed, or auto (the planner chooses)")
    .option("--precision <mode>", "the transformer's linears on a GPU: exact (default), fp8, fp8-weight, int8, int8-dynamic (lossy), or auto (exact unless it does not fit)")
    .option("--random-weights", "build the catalog model's architecture with random weights: for timings only, the video is noise")
    .option("--frames-dir <dir>", "also write the frames as PNGs into this new or empty folder")
    .option("--preview <file.png>", "watch it denoise: the middle frame of the video the model predicts, replaced in this PNG every few steps (at the latents' resolution, 1/8 of the size)")
    .option("--preview-every <n>", "steps between previews (default: about ten per run)")
    .requiredOption("--out <file.mp4>", "the video to write (H.264 MP4)")
    .option("--json", "print the result as one JSON object on stdout")
    .action(async (flags: GenerateFlags) => {
      const options: GenerateOptions = {
        model: flags.model,
        prompt: flags.prompt,
        negativePrompt: flags.negativePrompt,
        ...jobShape(flags),
        fps: numberFlag(flags.fps, "fps"),
        device: flags.device,
        dtype: flags.dtype,
        randomWeights: flags.randomWeights ?? false,
        compile: flags.compile ?? false,
        vram: flags.vram,
        ram: flags.ram,
        memoryLevel: flags.memoryLevel,
        precision: flags.precision,
        out: flags.out,
        framesDir: flags.framesDir,
        preview: flags.preview,
        previewEvery: integerFlag(flags.previewEvery, "previewEvery"),
      };
      const progress = new ProgressReporter({ write: ctx.io.stderr, tty: ctx.io.stderrIsTTY, columns: ctx.io.columns });
      let outcome: GenerateOutcome;
      try {
        outcome = await generateVideo(
          options,
          {
            config: ctx.config,
            startEngine: ctx.startEngine,
            makeTiny: (dir, signal) => ctx.tools.makeTiny(dir, undefined, { signal, logger: ctx.logger }),
            cwd: ctx.cwd,
          },
          { onNotice: (m) => progress.notice(`kino: ${m}`), onEvent: progress.onEvent, signal: ctx.signal },
        );
      } finally {
        progress.finish();
      }
      if (flags.json) ctx.io.stdout(JSON.stringify(outcomeJson(outcome)) + "\n");
      else ctx.io.stderr(summary(outcome));
    });
}

/** The `--json` document: the result, its timings, the model and the job as resolved. */
export function outcomeJson(o: GenerateOutcome): Record<string, unknown> {
  return {
    ok: true,
    model: o.model,
    device: o.device,
    dtype: o.dtype,
    job: o.job,
    load: o.load,
    result: o.result,
    timings: { ...o.result.timings, loadMs: o.load.loadMs, wallMs: o.wallMs },
  };
}

export function summary(o: GenerateOutcome): string {
  const r = o.result;
  const t = r.timings;
  const lines = [
    `done in ${seconds(o.wallMs)} (engine start and load ${seconds(Math.max(0, o.wallMs - t.totalMs))})`,
    `  text encode ${seconds(t.textEncodeMs)} · denoise ${seconds(t.denoiseMs)} (${r.secondsPerStep.toFixed(2)} s/step × ${o.job.steps}) · decode ${seconds(t.decodeMs)} · encode ${seconds(t.encodeMs)}`,
    `  peak VRAM ${r.peakVramBytes === null ? `n/a (${o.device})` : bytes(r.peakVramBytes)} · peak RAM ${bytes(r.peakRamBytes)}`,
  ];
  if (r.output.video !== null) lines.push(`  video  ${r.output.video} (${r.frames} frames, ${r.width}x${r.height} at ${r.fps} fps)`);
  if (r.output.framesDir !== null) lines.push(`  frames ${r.output.framesDir}/ (${r.frames} PNG)`);
  if (o.job.preview !== undefined && o.preview !== null) lines.push(`  preview ${o.preview} (the last, every ${o.job.preview.every} steps)`);
  if (o.model.noise) lines.push(`  (${o.model.name} has random weights: the video is noise)`);
  return lines.join("\n") + "\n";
}
