/**
 * What every command gets: where to write, the resolved config, how to start an engine and run the
 * engine's tools, and the signal that Ctrl-C aborts. main.ts builds the real one; tests build their
 * own (a FakeEngine, captured output).
 */
import type { KinoConfig } from "../config/config.ts";
import type { ModelTools } from "../api/models.ts";
import type { EngineFactory } from "../engine/client.ts";
import type { Logger } from "../log.ts";

export interface CliIO {
  readonly stdout: (text: string) => void;
  readonly stderr: (text: string) => void;
  /** Whether stderr is a terminal (progress bars) or a file/pipe (plain lines). */
  readonly stderrIsTTY: boolean;
  /** Terminal width, for the progress bar. @default 80 */
  readonly columns?: number;
}

export interface CliContext {
  /** The command line being run, without node and the script (for provenance in reports). */
  readonly argv: readonly string[];
  readonly io: CliIO;
  readonly config: KinoConfig;
  readonly cwd: string;
  readonly logger: Logger;
  /** Print stack traces of errors (--debug). */
  readonly debug: boolean;
  readonly startEngine: EngineFactory;
  readonly tools: ModelTools;
  /** Aborted on Ctrl-C. */
  readonly signal: AbortSignal;
}
