/**
 * Shows engine events on stderr: on a terminal, one line redrawn in place (phase, a bar of steps,
 * s/step, ETA); elsewhere (a log file, CI), plain lines that read well when nothing is redrawn.
 */
import type { EngineEvent, Phase } from "../protocol/engine.ts";
import { bytes, clock, seconds } from "./format.ts";

const PHASE_NAMES: Record<Phase, string> = {
  load: "load",
  text_encode: "text encode",
  denoise: "denoise",
  decode: "decode",
  encode: "encode",
};

export interface ProgressOptions {
  readonly write: (text: string) => void;
  readonly tty: boolean;
  /** @default 80 */
  readonly columns?: number;
  /** @default performance.now */
  readonly now?: () => number;
}

export class ProgressReporter {
  readonly #write: (text: string) => void;
  readonly #tty: boolean;
  readonly #columns: number;
  readonly #now: () => number;
  #phase: Phase | null = null;
  #phaseStart = 0;
  #stepMs: number[] = [];
  /** A redrawn line is on screen and must be cleared before anything else is written. */
  #drawn = false;

  constructor(options: ProgressOptions) {
    this.#write = options.write;
    this.#tty = options.tty;
    this.#columns = options.columns ?? 80;
    this.#now = options.now ?? (() => performance.now());
  }

  readonly onEvent = (event: EngineEvent): void => {
    switch (event.kind) {
      case "phase":
        if (event.state === "start") {
          this.#phase = event.phase;
          this.#phaseStart = this.#now();
          if (event.phase === "denoise") this.#stepMs = [];
          if (this.#tty) this.#draw(`${PHASE_NAMES[event.phase]} …`);
          else this.#line(`${PHASE_NAMES[event.phase]} …`);
        } else {
          const ms = event.ms ?? this.#now() - this.#phaseStart;
          this.#line(`${PHASE_NAMES[event.phase]} done in ${seconds(ms)}`);
          this.#phase = null;
        }
        return;
      case "step": {
        this.#stepMs.push(event.ms);
        // The mean of the recent steps: the first steps carry warm-up, the rest are steady.
        const recent = this.#stepMs.slice(-10);
        const perStep = recent.reduce((a, b) => a + b, 0) / recent.length;
        const eta = perStep * (event.n - event.i);
        const stats = `${event.i}/${event.n}  ${(perStep / 1000).toFixed(2)} s/step  ETA ${clock(eta)}`;
        if (this.#tty) this.#draw(`denoise ${this.#bar(event.i / event.n, stats.length)} ${stats}`);
        else this.#line(`denoise step ${stats}`);
        return;
      }
      case "load":
        if (this.#tty) this.#draw(`load ${event.component} ${bytes(event.bytes)}/${bytes(event.totalBytes)}`);
        return;
      case "log":
        if (event.level !== "debug") this.#line(`engine ${event.level}: ${event.message}`);
        return;
    }
  };

  /** Writes a message line without breaking a redrawn progress line. */
  notice(message: string): void {
    this.#line(message);
  }

  /** Clears any redrawn line (call before printing the summary or an error). */
  finish(): void {
    if (this.#drawn) this.#write("\r\x1b[K");
    this.#drawn = false;
  }

  #bar(fraction: number, reserved: number): string {
    const width = Math.max(10, Math.min(40, this.#columns - reserved - 12));
    const full = Math.round(fraction * width);
    return "█".repeat(full) + "░".repeat(width - full);
  }

  #draw(text: string): void {
    this.#write(`\r\x1b[K${text.slice(0, this.#columns - 1)}`);
    this.#drawn = true;
  }

  #line(text: string): void {
    this.finish();
    this.#write(text + "\n");
  }
}
