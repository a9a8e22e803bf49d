/**
 * Engine events → the job's progress events: phases as they start, and each denoising step with its
 * pace, ETA and the memory the engine measured after it (what the web UI charts).
 */
import type { EngineEvent } from "../../protocol/engine.ts";
import type { JobEventData } from "../schemas.ts";

export class ProgressTracker {
  #stepMs = 0;
  #steps = 0;

  /** The progress event for an engine event, or null for those clients are not told (phase ends, logs, load bytes) or told otherwise (previews: previews.ts). */
  toEvent(event: EngineEvent): JobEventData | null {
    if (event.kind === "phase" && event.state === "start" && event.phase !== "load") {
      return { type: "progress", phase: event.phase, step: null, total: null, s_per_step: null, eta: null, vram_bytes: null, ram_bytes: null };
    }
    if (event.kind === "step") {
      this.#stepMs += event.ms;
      this.#steps++;
      const sPerStep = this.#stepMs / this.#steps / 1000;
      return {
        type: "progress",
        phase: "denoise",
        step: event.i,
        total: event.n,
        s_per_step: round(sPerStep),
        eta: round(sPerStep * (event.n - event.i)),
        vram_bytes: event.vramBytes,
        ram_bytes: event.ramBytes,
      };
    }
    return null;
  }
}

function round(seconds: number): number {
  return Math.round(seconds * 1000) / 1000;
}
