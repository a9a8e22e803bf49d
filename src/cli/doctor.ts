/** `kino doctor`: a report of what kino needs on this machine, each missing item with its fix. */
import { Command } from "commander";
import { runDoctor, type DoctorReport } from "../api/doctor.ts";
import { KinoError } from "../errors.ts";
import type { CliContext } from "./context.ts";

export function doctorCommand(ctx: CliContext): Command {
  return new Command("doctor")
    .description("check Node, the Python engine, torch, CUDA, GPUs, the encoder, ffmpeg and the models")
    .option("--json", "print the report as one JSON object on stdout")
    .action(async (flags: { json?: boolean }) => {
      const report = await runDoctor({ config: ctx.config, startEngine: ctx.startEngine });
      if (flags.json) ctx.io.stdout(JSON.stringify(report) + "\n");
      else ctx.io.stdout(formatReport(report));
      const missing = report.checks.filter((c) => c.status === "missing" && c.required);
      if (missing.length > 0) {
        throw new KinoError("DOCTOR_FAILED", `${missing.length} required item(s) missing: ${missing.map((c) => c.name).join(", ")} (fixes above)`);
      }
    });
}

export function formatReport(report: DoctorReport): string {
  const width = Math.max(...report.checks.map((c) => c.name.length));
  const mark = { ok: "ok  ", warn: "warn", missing: "MISS" } as const;
  const lines = report.checks.map((c) => {
    const line = `${mark[c.status]}  ${c.name.padEnd(width)}  ${c.detail}`;
    return c.fix === null ? line : `${line}\n      ${" ".repeat(width)}  fix: ${c.fix}`;
  });
  return lines.join("\n") + "\n";
}
