/**
 * The protocol's generate_batch (protocol/engine.ts): the request refuses jobs that cannot share one
 * denoising loop, naming the field that differs, and ids that would make answers or cancels ambiguous.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { BATCH_SHAPE_FIELDS, EngineRequest, GenerateBatchRequest, GenerateBatchResult, JobSpec, type JobSpec as Job } from "../src/protocol/engine.ts";

const JOB: Job = {
  prompt: "p",
  negativePrompt: "",
  width: 64,
  height: 48,
  frames: 5,
  steps: 3,
  guidance: 5,
  shift: null,
  seed: 0,
  fps: null,
  output: { video: "/tmp/a.mp4", framesDir: null },
};

const batch = (...jobs: Array<Partial<Job>>) => ({ type: "generate_batch", id: "b", jobs: jobs.map((over, k) => ({ id: `j${k}`, job: { ...JOB, ...over } })) });

/** The path of the first issue, as SubprocessEngine names the field of an invalid request. */
function refusedField(request: unknown): string {
  const parsed = EngineRequest.safeParse(request);
  assert.ok(!parsed.success, `expected a refusal of ${JSON.stringify(request).slice(0, 200)}`);
  return parsed.error.issues[0]!.path.map(String).join(".");
}

test("a batch of one shape parses, each job keeping its prompt, seed, output, fps and decode", () => {
  const request = batch({ seed: 1 }, { seed: 2, prompt: "q", fps: 8, output: { video: "/tmp/b.mp4", framesDir: null }, vaeDecode: { mode: "tiled", tile: 64 } });
  const parsed = GenerateBatchRequest.parse(request);
  assert.deepEqual(parsed.jobs.map((j) => [j.id, j.job.seed, j.job.prompt]), [["j0", 1, "p"], ["j1", 2, "q"]]);
  assert.equal(EngineRequest.parse(request).type, "generate_batch");
});

test("every shape field is a JobSpec field, and a job that differs in one is refused naming it", () => {
  const different: Record<(typeof BATCH_SHAPE_FIELDS)[number], unknown> = { width: 80, height: 64, frames: 9, steps: 4, guidance: 4, shift: 3, cfg: "sequential" };
  for (const field of BATCH_SHAPE_FIELDS) {
    assert.ok(field in JobSpec.shape, `${field} is not a JobSpec field`);
    assert.equal(refusedField(batch({}, {}, { [field]: different[field] })), `jobs.2.job.${field}`, field);
  }
  const parsed = GenerateBatchRequest.safeParse(batch({}, { steps: 4 }));
  assert.match(parsed.error!.issues[0]!.message, /must equal jobs\.0\.job\.steps \(3\) for the jobs to share one denoising loop, got 4/);
});

test("ids: each job's differs from the batch's and the others'; a batch holds at least one job", () => {
  assert.equal(refusedField({ ...batch({}, {}), jobs: [{ id: "x", job: JOB }, { id: "x", job: JOB }] }), "jobs.1.id");
  assert.equal(refusedField({ ...batch({}), jobs: [{ id: "b", job: JOB }] }), "jobs.0.id");
  assert.equal(refusedField({ ...batch(), jobs: [] }), "jobs");
});

test("the batch's result says how each job ended", () => {
  assert.deepEqual(GenerateBatchResult.parse({ jobs: [{ id: "j0", status: "completed" }, { id: "j1", status: "cancelled" }] }).jobs.length, 2);
  assert.ok(!GenerateBatchResult.safeParse({ jobs: [{ id: "j0", status: "running" }] }).success);
});
