/**
 * How the page words numbers: bytes, durations, a job's progress line and the planner's estimate.
 * Pure (no DOM), so the server's tests run it in Node.
 */
import type { JobEventData, JobResult, PlanEstimate } from "../server/schemas.ts";

type Progress = Extract<JobEventData, { type: "progress" }>;

const GiB = 2 ** 30;
const MiB = 2 ** 20;

export function formatBytes(bytes: number): string {
  return bytes >= GiB ? `${(bytes / GiB).toFixed(1)} GiB` : `${Math.round(bytes / MiB)} MiB`;
}

export function formatDuration(seconds: number): string {
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  const rest = Math.round(seconds - minutes * 60);
  if (minutes < 60) return rest === 0 ? `${minutes} min` : `${minutes} min ${rest} s`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${minutes - hours * 60} min`;
}

/** Seconds per step, with three decimals below one second (a CPU test job's steps are hundredths). */
export function formatPerStep(seconds: number): string {
  return `${seconds.toFixed(seconds < 1 ? 3 : 2)} s/step`;
}

const PHASES: Readonly<Record<Progress["phase"], string>> = {
  load: "loading the model",
  text_encode: "encoding the prompt",
  denoise: "denoising",
  decode: "decoding the frames",
  encode: "writing the video",
};

/** "denoising · step 3/10 · 0.21 s/step · ETA 1.5 s", or the phase alone between steps. */
export function progressLine(p: Progress): string {
  const parts = [PHASES[p.phase]];
  if (p.step !== null && p.total !== null) parts.push(`step ${p.step}/${p.total}`);
  if (p.s_per_step !== null) parts.push(formatPerStep(p.s_per_step));
  if (p.eta !== null && p.step !== p.total) parts.push(`ETA ${formatDuration(p.eta)}`);
  return parts.join(" · ");
}

/** The estimate under the form: peaks, time, placement, and what it was planned on. */
export function estimateLine(plan: PlanEstimate): string {
  const e = plan.estimate;
  if (e === null) return `${plan.width}x${plan.height}, ${plan.frames} frames, ${plan.steps} steps: no estimate (${plan.note})`;
  return (
    `peak VRAM ${formatBytes(e.peakVramBytes)} · RAM ${formatBytes(e.peakRamBytes)} · about ${formatDuration(e.seconds)} ` +
    `(${formatDuration(e.secondsPerStep)}/step) · transformer ${e.transformer}, decode ${e.decode} — ${plan.note}`
  );
}

/** "done: 9 frames 160x96 in 4.2 s · 0.312 s/step" */
export function resultLine(r: JobResult): string {
  const peak = r.peakVramBytes === null ? `peak RAM ${formatBytes(r.peakRamBytes)}` : `peak VRAM ${formatBytes(r.peakVramBytes)}`;
  return `done: ${r.frames} frames ${r.width}x${r.height} in ${formatDuration(r.timings.totalMs / 1000)} · ${formatPerStep(r.secondsPerStep)} · ${peak}`;
}
