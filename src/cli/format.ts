/** Formatting shared by the commands: durations, sizes, flags and errors as the CLI shows them. */
import type { KinoError } from "../errors.ts";

/** A request field as the CLI flag that sets it: framesDir → --frames-dir. Protocol paths stay as they are. */
export function flagOf(field: string): string {
  if (field.includes(".")) return field;
  return "--" + field.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());
}

export function seconds(ms: number): string {
  const s = ms / 1000;
  return s < 10 ? `${s.toFixed(2)} s` : s < 100 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
}

/** 75 → "1:15" */
export function clock(ms: number): string {
  const total = Math.max(0, Math.round(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

export function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

/** The error as the user sees it: one line naming the flag and the fix, then hint and engine stderr. */
export function formatError(error: KinoError, debug: boolean): string {
  const where = error.field !== null ? `${flagOf(error.field)}: ` : "";
  const phase = error.phase !== null && error.phase !== undefined ? ` (during ${error.phase})` : "";
  const lines = [`kino: ${where}${error.message}${phase} [${error.code}]`];
  if (error.hint !== undefined) lines.push(`  hint: ${error.hint}`);
  // The engine's traceback helps with failures (exit 1); a refused request already says what to fix.
  const tail = debug || error.exitCode === 1 ? error.stderrTail?.trimEnd() : undefined;
  if (tail) {
    const shown = debug ? tail : tail.split("\n").slice(-20).join("\n");
    lines.push("  engine stderr (last lines):", ...shown.split("\n").map((l) => `    ${l}`));
  }
  if (debug) {
    lines.push(error.stack ?? "");
    let cause = error.cause;
    while (cause instanceof Error) {
      lines.push(`caused by: ${cause.stack ?? cause.message}`);
      cause = cause.cause;
    }
  }
  return lines.join("\n") + "\n";
}

/** Rows under a header, columns padded to their widest cell: the first left-aligned, the others right-aligned. */
export function formatTable(head: readonly string[], rows: readonly (readonly string[])[]): string {
  const all = [head, ...rows];
  const widths = head.map((_, i) => Math.max(...all.map((row) => (row[i] ?? "").length)));
  const line = (row: readonly string[]) =>
    widths.map((w, i) => (i === 0 ? (row[i] ?? "").padEnd(w) : (row[i] ?? "").padStart(w))).join("  ").trimEnd() + "\n";
  return all.map(line).join("");
}
