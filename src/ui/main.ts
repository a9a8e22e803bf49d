/**
 * kino's web page: a job form with the planner's estimate, the followed job's live progress (s/step,
 * ETA), its latest preview image, its memory chart and a cancel button, and the gallery of finished
 * videos. Talks only to the native API of the server that serves it.
 */
import type { Health, Job, JobEvent, ModelList, PlanEstimate } from "../server/schemas.ts";
import { Api, ApiError } from "./api.ts";
import { MemoryChart } from "./chart.ts";
import { followJob } from "./events.ts";
import { estimateLine, progressLine, resultLine } from "./format.ts";
import { Gallery } from "./gallery.ts";
import { applyEvent, INITIAL, type JobState } from "./job-state.ts";
import { PreviewPane } from "./preview.ts";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const api = new Api();
const gallery = new Gallery(api, $("gallery"));
const preview = new PreviewPane(api, $("preview"));
let chart: MemoryChart | null = null;
let following: AbortController | null = null;

const form = {
  prompt: $<HTMLTextAreaElement>("prompt"),
  model: $<HTMLSelectElement>("model"),
  size: $<HTMLInputElement>("size"),
  frames: $<HTMLInputElement>("frames"),
  steps: $<HTMLInputElement>("steps"),
  seed: $<HTMLInputElement>("seed"),
};

/** The job's shape as the form describes it (what the planner reads); empty fields take the model's defaults. */
function shape(): Record<string, unknown> {
  const body: Record<string, unknown> = { model: form.model.value };
  const size = form.size.value.trim();
  if (size !== "") body.size = size;
  for (const name of ["frames", "steps"] as const) {
    if (form[name].value !== "") body[name] = Number(form[name].value);
  }
  return body;
}

/** The job request: the shape, the prompt and the seed (random when empty). */
function request(): Record<string, unknown> {
  return { ...shape(), prompt: form.prompt.value, ...(form.seed.value === "" ? {} : { seed: Number(form.seed.value) }) };
}

function describe(err: unknown): string {
  return err instanceof ApiError ? `${err.message}` : String(err);
}

// ---- estimate ----

let estimateTimer: number | undefined;
let estimateSeq = 0;

function scheduleEstimate(): void {
  clearTimeout(estimateTimer);
  estimateTimer = window.setTimeout(() => void estimate(), 250);
}

async function estimate(): Promise<void> {
  const seq = ++estimateSeq;
  const out = $("estimate");
  try {
    const plan = await api.json<PlanEstimate>("POST", "/api/plan", shape());
    if (seq !== estimateSeq) return;
    out.textContent = estimateLine(plan);
    out.className = "estimate";
    out.dataset.vram = plan.estimate === null ? "" : String(plan.estimate.peakVramBytes);
  } catch (err) {
    if (seq !== estimateSeq) return;
    out.textContent = describe(err);
    out.className = "estimate error";
    out.dataset.vram = "";
  }
}

// ---- the followed job ----

function showJob(id: string, state: JobState): void {
  $("current").hidden = false;
  $("job-id").textContent = id.slice(0, 8);
  const status = $("job-status");
  status.textContent = state.status;
  status.dataset.status = state.status;
  const bar = $<HTMLProgressElement>("job-progress");
  const p = state.progress;
  if (state.status === "completed") bar.value = 100;
  else if (p?.step != null && p.total != null) bar.value = (100 * p.step) / p.total;
  $("job-line").textContent =
    state.error !== null
      ? `${state.error.code}: ${state.error.message}`
      : state.result !== null
        ? resultLine(state.result)
        : state.loading !== null
          ? `loading ${state.loading}…`
          : p === null
            ? state.status
            : progressLine(p);
  $("job-notice").textContent = state.notice ?? "";
  $<HTMLButtonElement>("cancel").disabled = !(state.status === "queued" || state.status === "running");
  if (state.preview !== null) preview.show(state.preview);
  chart ??= new MemoryChart($("chart"));
  chart.show(state.memory);
}

async function follow(job: Job): Promise<void> {
  following?.abort();
  const controller = new AbortController();
  following = controller;
  let state: JobState = INITIAL;
  // The last job's preview stays until now.
  preview.clear();
  $("cancel").dataset.job = job.id;
  showJob(job.id, state);
  try {
    await followJob(
      api,
      job.id,
      (event: JobEvent) => {
        state = applyEvent(state, event.data);
        showJob(job.id, state);
      },
      controller.signal,
    );
  } catch (err) {
    $("job-line").textContent = describe(err);
  }
  if (state.status === "completed") await gallery.refresh().catch((err: unknown) => console.warn(err));
}

// ---- start-up ----

async function connect(): Promise<void> {
  const health = $("health");
  try {
    const h = await api.json<Health>("GET", "/api/health");
    health.textContent = `engines ${h.status} · ${h.queue.running} running · ${h.queue.queued} queued`;
    health.dataset.status = h.status;
    $("key-form").hidden = true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      health.textContent = "this server needs an API key";
      $("key-form").hidden = false;
      return;
    }
    health.textContent = describe(err);
    return;
  }
  const { models } = await api.json<ModelList>("GET", "/api/models");
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.present || m.origin === "kino" ? m.id : `${m.id} (not downloaded)`;
    form.model.append(option);
  }
  await Promise.all([estimate(), gallery.refresh()]);
  // A job still running (the page was reloaded): follow it again.
  const running = await api.json<{ jobs: Job[] }>("GET", "/api/jobs?status=running&limit=1");
  if (running.jobs[0] !== undefined) void follow(running.jobs[0]);
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  api.setKey($<HTMLInputElement>("key").value);
  void connect();
});

$("job-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const error = $("form-error");
  error.hidden = true;
  const submit = $<HTMLButtonElement>("submit");
  submit.disabled = true;
  api
    .json<Job>("POST", "/api/jobs", request())
    .then((job) => void follow(job))
    .catch((err: unknown) => {
      error.textContent = describe(err);
      error.hidden = false;
    })
    .finally(() => (submit.disabled = false));
});

for (const input of [form.model, form.size, form.frames, form.steps]) input.addEventListener("input", scheduleEstimate);

$("cancel").addEventListener("click", () => {
  const id = $("cancel").dataset.job;
  if (id !== undefined) api.json("POST", `/api/jobs/${id}/cancel`).catch((err: unknown) => ($("job-line").textContent = describe(err)));
});

void connect();
