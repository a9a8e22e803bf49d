/**
 * The smallest logger that serves the CLI: leveled lines to a writer (stderr). Library code takes a
 * `Logger` and never writes to the console itself.
 */
export type LogLevel = "debug" | "info" | "warn" | "silent";

export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
}

const RANK: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, silent: 3 };

/** Writes messages at `level` and above as "kino <level>: message" lines. */
export function createLogger(write: (line: string) => void, level: LogLevel): Logger {
  const at = (l: Exclude<LogLevel, "silent">) => (message: string) => {
    if (RANK[l] >= RANK[level]) write(`kino ${l}: ${message}\n`);
  };
  return { debug: at("debug"), info: at("info"), warn: at("warn") };
}

export const silentLogger: Logger = createLogger(() => {}, "silent");
