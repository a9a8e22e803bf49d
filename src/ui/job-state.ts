/**
 * What the page shows of the job it follows, folded from the job's events (the same events the SSE
 * stream carries): status, the latest progress and preview, and the memory series for the chart.
 * Pure (no DOM).
 */
import type { ErrorInfo, JobEventData, JobResult, JobStatus } from "../server/schemas.ts";

type Progress = Extract<JobEventData, { type: "progress" }>;
export type Preview = Extract<JobEventData, { type: "preview" }>;

export interface MemorySeries {
  /** Denoising step of each sample. */
  readonly step: number[];
  /** GiB; null where the engine measured none (the CPU has no VRAM). */
  readonly vram: Array<number | null>;
  readonly ram: Array<number | null>;
}

export interface JobState {
  readonly status: JobStatus;
  readonly progress: Progress | null;
  /** The latest preview (its url serves the image); it stays after the job ends. */
  readonly preview: Preview | null;
  /** The model being loaded for the job; null once it runs. */
  readonly loading: string | null;
  /** The latest decision the server took for the job (tiny model made, requeued …). */
  readonly notice: string | null;
  readonly error: ErrorInfo | null;
  readonly result: JobResult | null;
  readonly memory: MemorySeries;
}

export const INITIAL: JobState = {
  status: "queued",
  progress: null,
  preview: null,
  loading: null,
  notice: null,
  error: null,
  result: null,
  memory: { step: [], vram: [], ram: [] },
};

const GiB = 2 ** 30;

export function applyEvent(state: JobState, event: JobEventData): JobState {
  switch (event.type) {
    case "queued":
      return { ...state, status: "queued" };
    case "started":
      // A new attempt (after a requeue) starts its steps again.
      return { ...state, status: "running", memory: INITIAL.memory };
    case "model.loading":
      return { ...state, loading: event.model };
    case "notice":
      return { ...state, notice: event.message };
    case "progress": {
      if (event.step === null || (event.vram_bytes === null && event.ram_bytes === null)) return { ...state, progress: event, loading: null };
      const { step, vram, ram } = state.memory;
      const gib = (b: number | null) => (b === null ? null : b / GiB);
      return {
        ...state,
        progress: event,
        loading: null,
        memory: { step: [...step, event.step], vram: [...vram, gib(event.vram_bytes)], ram: [...ram, gib(event.ram_bytes)] },
      };
    }
    case "preview":
      return { ...state, preview: event };
    case "output":
      return state;
    case "completed":
      // What was decided on the way (the tiny model made, a retry) no longer matters once it is done.
      return { ...state, status: "completed", result: event.result, notice: null };
    case "failed":
      return { ...state, status: "failed", error: event.error };
    case "cancelled":
      return { ...state, status: "cancelled", notice: event.reason };
  }
}
