/**
 * `kino bench-http`: a running `kino serve` measured from the outside, over HTTP, as its clients see it:
 * from a `POST /api/jobs` to the job's first denoising step, split into what the engine spent (its
 * text encode and that step, from the job's own figures) and what the control plane added around it
 * (the HTTP request, validation and admission, the durable store, the scheduler, the engine protocol's
 * hop and the engine's own bookkeeping): issue 5's "request → first step" with the HTTP hop that
 * `kino bench-serve` (engine level) leaves out.
 *
 * Times: the client's clock (before the POST, when the answer came, when each SSE event arrived) and
 * the server's (each stored event's `at`, when the server recorded it): the same wall clock when both
 * run on one machine, which this assumes; `at` has millisecond resolution, so figures are medians
 * over several requests. Each request has a new prompt or a cached one (the warm-up's), so both
 * kinds are measured on a warm engine.
 */
import { randomUUID } from "node:crypto";
import { EventSourceParserStream } from "eventsource-parser/stream";
import { z } from "zod";
import { KinoError } from "../errors.ts";
import { median } from "../planner/learn.ts";
import { gpuSlug, parseOptions, ProvenanceSchema, readToolAnswer, writeRecord, type Provenance } from "./bench.ts";
import { Stats } from "./serve-bench.ts";

export const HttpBenchOptions = z.object({
  /** The server, e.g. http://127.0.0.1:8188. */
  url: z.url(),
  apiKey: z.string().min(1).optional(),
  model: z.string().min(1).default("auto"),
  randomWeights: z.boolean().default(false),
  size: z.string().optional(),
  frames: z.number().int().positive().optional(),
  /** Steps of each job: the first is what is measured; the fewer, the shorter the run. @default 2 */
  steps: z.number().int().positive().default(2),
  /** Requests of each kind (new prompt, cached prompt). @default 5 */
  runs: z.number().int().positive().default(5),
});
export type HttpBenchOptions = z.input<typeof HttpBenchOptions>;

export const HttpBenchSpec = HttpBenchOptions.omit({ apiKey: true }).extend({ provenance: ProvenanceSchema });
export type HttpBenchSpec = z.infer<typeof HttpBenchSpec>;

export type HttpStats = Stats;

/** One request's figures (ms). */
export const HttpRun = z.object({
  kind: z.enum(["newPrompt", "cachedPrompt"]),
  /** Client: before the POST → the server recorded step 1 (the engine's step event arrived). */
  requestToFirstStepMs: z.number(),
  /** Client: the POST's round trip (validation, admission, the job stored and queued). */
  postMs: z.number(),
  /** Client POST → the server recorded the job as started (queue and scheduler). */
  toStartedMs: z.number(),
  /** The engine's own: its text encode and its first step, as the job reports them. */
  engineMs: z.number(),
  /** requestToFirstStepMs − engineMs: what the control plane and the engine's bookkeeping added. */
  controlPlaneMs: z.number(),
  /** Server recorded step 1 → the client received its SSE event (live events only; null when replayed). */
  sseDeliveryMs: z.number().nullable(),
  promptCache: z.object({ hits: z.number(), misses: z.number() }).nullable(),
});
export type HttpRun = z.infer<typeof HttpRun>;

const KindFigures = z.object({
  requestToFirstStepMs: Stats,
  postMs: Stats,
  toStartedMs: Stats,
  engineMs: Stats,
  controlPlaneMs: Stats,
  sseDeliveryMs: Stats.nullable(),
});

export const HttpBenchRaw = z.looseObject({
  spec: HttpBenchSpec,
  server: z.object({ device: z.string(), model: z.string() }),
  runs: z.array(HttpRun),
  figures: z.object({ newPrompt: KindFigures, cachedPrompt: KindFigures }),
});
export type HttpBenchRaw = z.infer<typeof HttpBenchRaw>;

export interface HttpBenchReport extends HttpBenchRaw {
  readonly kind: "kino-http-bench/v1";
  readonly recordedAt: string;
}

export function httpBenchSpec(input: HttpBenchOptions, provenance: Provenance): HttpBenchSpec & { apiKey?: string } {
  const o = parseOptions(HttpBenchOptions, input);
  return { ...o, url: o.url.replace(/\/+$/, ""), provenance };
}

/** A job event as the SSE stream carries it, with when it arrived here. */
interface Received {
  readonly type: string;
  readonly at: number;
  readonly arrived: number;
  readonly data: Record<string, unknown>;
}

const now = () => performance.timeOrigin + performance.now();

/** Runs the measurement against the server at `spec.url`. */
export async function runHttpBench(spec: HttpBenchSpec & { apiKey?: string }, log: (line: string) => void = () => {}): Promise<HttpBenchRaw> {
  const client = new HttpClient(spec.url, spec.apiKey);
  const health = await client.json<{ engines: { engine: number }[] }>("GET", "/api/health");
  if (health.engines.length === 0) throw new KinoError("ENGINE_UNAVAILABLE", `${spec.url} has no engine`);
  const cached = `kino bench-http cached prompt ${randomUUID()}`;
  log(`[bench-http] warm-up job on ${spec.url} (loads the model, encodes the cached prompt)`);
  const warm = await client.runJob(jobBody(spec, cached));
  if (warm.status !== "completed") throw new KinoError("TOOL_FAILED", `the warm-up job ended ${warm.status}: ${JSON.stringify(warm.error)}`);
  const runs: HttpRun[] = [];
  for (let r = 0; r < spec.runs; r++) {
    for (const kind of ["newPrompt", "cachedPrompt"] as const) {
      const prompt = kind === "cachedPrompt" ? cached : `kino bench-http prompt ${randomUUID()}`;
      const run = await client.runJob(jobBody(spec, prompt));
      if (run.status !== "completed") throw new KinoError("TOOL_FAILED", `request ${r + 1} (${kind}) ended ${run.status}: ${JSON.stringify(run.error)}`);
      runs.push(figuresOf(kind, run));
      log(`[bench-http] ${kind} ${r + 1}/${spec.runs}: ${runs.at(-1)!.requestToFirstStepMs.toFixed(1)} ms to step 1`);
    }
  }
  const ps = await client.json<{ engines: { device: { name: string } | null; model: string | null }[] }>("GET", "/api/ps");
  const engine = ps.engines.find((e) => e.model !== null) ?? ps.engines[0]!;
  return HttpBenchRaw.parse({
    spec: { ...spec, apiKey: undefined },
    server: { device: engine.device?.name ?? "cpu", model: engine.model ?? spec.model },
    runs,
    figures: { newPrompt: kindFigures(runs, "newPrompt"), cachedPrompt: kindFigures(runs, "cachedPrompt") },
  });
}

function jobBody(spec: HttpBenchSpec, prompt: string): Record<string, unknown> {
  return {
    model: spec.model,
    prompt,
    steps: spec.steps,
    seed: 1,
    ...(spec.size === undefined ? {} : { size: spec.size }),
    ...(spec.frames === undefined ? {} : { frames: spec.frames }),
    ...(spec.randomWeights ? { randomWeights: true } : {}),
    keepAlive: "5m",
  };
}

interface FinishedJob {
  readonly status: string;
  readonly error: unknown;
  readonly sentAt: number;
  readonly answeredAt: number;
  readonly events: readonly Received[];
  readonly result: { timings: { textEncodeMs: number }; cache?: { promptHits: number; promptMisses: number } } | null;
}

/** One request's figures from its events and result. */
export function figuresOf(kind: HttpRun["kind"], job: FinishedJob): HttpRun {
  const started = job.events.find((e) => e.type === "started");
  const first = job.events.find((e) => e.type === "progress" && e.data.step === 1);
  if (started === undefined || first === undefined || job.result === null) {
    throw new KinoError("INTERNAL", `the job's events lack a started event or a step 1 (${job.events.map((e) => e.type).join(", ")})`);
  }
  // The first progress event's mean seconds per step is step 1's own time.
  const stepMs = Number(first.data.s_per_step) * 1000;
  const engineMs = job.result.timings.textEncodeMs + stepMs;
  const requestToFirstStepMs = first.at - job.sentAt;
  return {
    kind,
    requestToFirstStepMs,
    postMs: job.answeredAt - job.sentAt,
    toStartedMs: started.at - job.sentAt,
    engineMs,
    controlPlaneMs: requestToFirstStepMs - engineMs,
    // A replayed event arrived after the stream connected, not when it was recorded.
    sseDeliveryMs: first.arrived >= first.at && first.arrived - first.at < 1000 && first.at > job.answeredAt ? first.arrived - first.at : null,
    promptCache: job.result.cache === undefined ? null : { hits: job.result.cache.promptHits, misses: job.result.cache.promptMisses },
  };
}

function stats(values: number[]): HttpStats {
  const round = (v: number) => Math.round(v * 100) / 100;
  return { values: values.map(round), median: round(median(values)), min: round(Math.min(...values)), max: round(Math.max(...values)) };
}

function kindFigures(runs: readonly HttpRun[], kind: HttpRun["kind"]): z.infer<typeof KindFigures> {
  const mine = runs.filter((r) => r.kind === kind);
  const delivery = mine.map((r) => r.sseDeliveryMs).filter((v): v is number => v !== null);
  return {
    requestToFirstStepMs: stats(mine.map((r) => r.requestToFirstStepMs)),
    postMs: stats(mine.map((r) => r.postMs)),
    toStartedMs: stats(mine.map((r) => r.toStartedMs)),
    engineMs: stats(mine.map((r) => r.engineMs)),
    controlPlaneMs: stats(mine.map((r) => r.controlPlaneMs)),
    sseDeliveryMs: delivery.length === 0 ? null : stats(delivery),
  };
}

/** The native API as the bench uses it: JSON requests with the key, a job followed over SSE to its end. */
class HttpClient {
  readonly base: string;
  readonly apiKey: string | undefined;

  constructor(base: string, apiKey: string | undefined) {
    this.base = base;
    this.apiKey = apiKey;
  }

  #headers(extra: Record<string, string> = {}): Record<string, string> {
    return { ...extra, ...(this.apiKey === undefined ? {} : { authorization: `Bearer ${this.apiKey}` }) };
  }

  async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(`${this.base}${path}`, {
      method,
      headers: this.#headers(body === undefined ? {} : { "content-type": "application/json" }),
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    const text = await res.text();
    if (!res.ok) throw new KinoError("TOOL_FAILED", `${method} ${path}: HTTP ${res.status} ${text.slice(0, 300)}`);
    return JSON.parse(text) as T;
  }

  /** Submits a job and follows its events to the terminal one. */
  async runJob(body: Record<string, unknown>): Promise<FinishedJob> {
    const sentAt = now();
    const job = await this.json<{ id: string }>("POST", "/api/jobs", body);
    const answeredAt = now();
    const events: Received[] = [];
    const res = await fetch(`${this.base}/api/jobs/${job.id}/events`, { headers: this.#headers({ accept: "text/event-stream" }) });
    if (!res.ok || res.body === null) throw new KinoError("TOOL_FAILED", `events of job ${job.id}: HTTP ${res.status}`);
    let status = "unknown";
    let error: unknown = null;
    const stream = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
    for await (const message of stream) {
      const arrived = now();
      const event = JSON.parse(message.data) as { at: string; data: Record<string, unknown> & { type: string } };
      events.push({ type: event.data.type, at: Date.parse(event.at), arrived, data: event.data });
      if (["completed", "failed", "cancelled"].includes(event.data.type)) {
        status = event.data.type;
        error = event.data.error ?? null;
        break;
      }
    }
    const final = await this.json<{ result: FinishedJob["result"] }>("GET", `/api/jobs/${job.id}`);
    return { status, error, sentAt, answeredAt, events, result: final.result };
  }
}

export function httpBenchReport(raw: HttpBenchRaw, at: Date = new Date()): HttpBenchReport {
  return { ...raw, kind: "kino-http-bench/v1", recordedAt: at.toISOString() };
}

export function readHttpRaw(path: string): Promise<HttpBenchRaw> {
  return readToolAnswer(path, HttpBenchRaw, "kino http bench");
}

/** 2026-12-04-cpu-tiny-64x48-2steps-http-abc1234.json; never replaces a record. */
export function httpRecordName(report: HttpBenchReport): string {
  const commit = report.spec.provenance.commit?.slice(0, 7);
  const shape = `${report.spec.size ?? "default"}${report.spec.frames === undefined ? "" : `x${report.spec.frames}`}`;
  return `${report.recordedAt.slice(0, 10)}-${gpuSlug(report.server.device === "cpu" ? undefined : report.server.device)}-${report.server.model}-${shape}-${report.spec.steps}steps-http${commit ? `-${commit}` : ""}.json`;
}

export function recordHttpBench(report: HttpBenchReport, dir: string): Promise<string> {
  return writeRecord(report, dir, httpRecordName(report));
}
