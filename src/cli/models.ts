/** `kino models list | make-tiny | pull`. */
import { Command } from "commander";
import { checkTinySeed, listModels, makeTinyModel, pullModel } from "../api/models.ts";
import type { CliContext } from "./context.ts";
import { integerFlag } from "./flags.ts";

export function modelsCommand(ctx: CliContext): Command {
  const models = new Command("models").description("list, make and download models");

  models
    .command("list")
    .description("the catalog's models and which are here")
    .option("--json", "print the list as one JSON object on stdout")
    .action(async (flags: { json?: boolean }) => {
      const list = await listModels(ctx.config);
      if (flags.json) return ctx.io.stdout(JSON.stringify({ models: list }) + "\n");
      const width = Math.max(...list.map((m) => m.id.length));
      for (const m of list) {
        const where = m.present ? m.path : m.origin === "kino" ? "made on first use" : `not downloaded (kino models pull ${m.id})`;
        ctx.io.stdout(`${m.id.padEnd(width)}  ${m.present ? "present" : "absent "}  ${m.description}\n${" ".repeat(width)}  ${where}\n`);
      }
    });

  models
    .command("make-tiny")
    .description("make kino's tiny Wan checkpoint (random weights: its videos are noise) in a new folder")
    .argument("<dir>", "a new or empty folder")
    .option("--seed <n>", "seed of the random weights")
    .option("--json", "print the result as one JSON object on stdout")
    .action(async (dir: string, flags: { seed?: string; json?: boolean }) => {
      const seed = integerFlag(flags.seed, "seed");
      checkTinySeed(seed);
      ctx.io.stderr(`kino: making a tiny checkpoint with random weights in ${dir}: whatever it generates is noise (it tests the pipeline)\n`);
      const { path, answer } = await makeTinyModel(dir, seed, { tools: ctx.tools, cwd: ctx.cwd }, { signal: ctx.signal, logger: ctx.logger });
      ctx.io.stdout(flags.json ? JSON.stringify({ ...answer, ok: true, path, noise: true }) + "\n" : `${path}\n`);
    });

  models
    .command("pull")
    .description("download a catalog model into $KINO_HOME/models/<id>")
    .argument("<id>", "a catalog id (kino models list)")
    .option("--json", "print the result as one JSON object on stdout")
    .action(async (id: string, flags: { json?: boolean }) => {
      const interactive = ctx.io.stderrIsTTY;
      const result = await pullModel(id, { tools: ctx.tools, config: ctx.config }, {
        signal: ctx.signal,
        logger: ctx.logger,
        // The download's own progress is worth seeing on a terminal.
        onStderrLine: interactive ? (line) => ctx.io.stderr(line + "\n") : undefined,
      });
      ctx.io.stderr(result.alreadyPresent ? `kino: ${id} is already in ${result.path}\n` : `kino: ${id} downloaded to ${result.path}\n`);
      ctx.io.stdout(flags.json ? JSON.stringify({ ok: true, ...result }) + "\n" : `${result.path}\n`);
    });

  return models;
}
