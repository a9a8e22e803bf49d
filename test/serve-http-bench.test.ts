/**
 * `kino bench-http`: the request → first step split measured against a real server over a socket
 * (FakeEngine with slow steps, so the engine's part is known), the figures' arithmetic on made-up
 * events, and the record's name and round trip.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { FakeEngine } from "../src/engine/fake.ts";
import { figuresOf, httpBenchReport, httpBenchSpec, httpRecordName, readHttpRaw, recordHttpBench, runHttpBench } from "../src/api/serve-http-bench.ts";
import { formatHttpBench } from "../src/cli/bench-http.ts";
import { startTestServer, type TestServer } from "./fixtures/server.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const PROVENANCE = { command: "kino bench-http", commit: "abcdef1234", dirty: false };

test("figuresOf: the engine's part from the job's figures, the rest is the control plane's", () => {
  const at = (ms: number) => 1_000_000 + ms;
  const run = figuresOf("newPrompt", {
    status: "completed",
    error: null,
    sentAt: at(0),
    answeredAt: at(4),
    events: [
      { type: "queued", at: at(3), arrived: at(5), data: {} },
      { type: "started", at: at(6), arrived: at(7), data: {} },
      { type: "progress", at: at(10), arrived: at(11), data: { phase: "text_encode", step: null } },
      { type: "progress", at: at(40), arrived: at(42), data: { phase: "denoise", step: 1, s_per_step: 0.02 } },
    ],
    result: { timings: { textEncodeMs: 8 } },
  });
  assert.equal(run.requestToFirstStepMs, 40);
  assert.equal(run.engineMs, 28, "text encode 8 ms + step 1 (its s_per_step) 20 ms");
  assert.equal(run.controlPlaneMs, 12);
  assert.equal(run.postMs, 4);
  assert.equal(run.toStartedMs, 6);
  assert.equal(run.sseDeliveryMs, 2, "a live event: arrival − record");
  assert.throws(
    () => figuresOf("cachedPrompt", { status: "completed", error: null, sentAt: 0, answeredAt: 1, events: [], result: null }),
    /lack a started event or a step 1/,
  );
});

describe("bench-http against a server with a 30 ms-per-step FakeEngine", { timeout: 60_000 }, () => {
  let t: TestServer;
  let url: string;
  const records = tempDir("kino-http-bench-");
  before(async () => {
    t = await startTestServer({ engine: () => new FakeEngine({ stepMs: 30 }) });
    url = await t.server.listen();
  });
  after(async () => {
    await t?.server.close();
    removeDir(records);
  });

  test("measures each kind, the engine's step inside the wait, and records a report that reads back", async () => {
    const spec = httpBenchSpec({ url: `${url}/`, model: "tiny", size: "64x48", frames: 5, steps: 2, runs: 2 }, PROVENANCE);
    assert.equal(spec.url, url, "a trailing slash is dropped");
    const lines: string[] = [];
    const raw = await runHttpBench(spec, (line) => lines.push(line));
    assert.equal(raw.runs.length, 4);
    assert.deepEqual(raw.runs.map((r) => r.kind), ["newPrompt", "cachedPrompt", "newPrompt", "cachedPrompt"]);
    for (const r of raw.runs) {
      assert.ok(r.engineMs >= 30, `the fake's 30 ms step is the engine's part: ${r.engineMs}`);
      assert.ok(r.requestToFirstStepMs >= r.engineMs, `step 1 cannot come before the engine's own time: ${JSON.stringify(r)}`);
      assert.ok(r.controlPlaneMs >= 0 && r.controlPlaneMs < 1000, `control plane ${r.controlPlaneMs} ms`);
      assert.ok(r.postMs > 0 && r.toStartedMs >= 0);
    }
    assert.equal(raw.server.device, "cpu");
    assert.equal(raw.figures.newPrompt.requestToFirstStepMs.values.length, 2);
    assert.ok(lines.some((l) => l.includes("warm-up")));
    const report = httpBenchReport(raw, new Date("2026-12-04T12:00:00Z"));
    assert.equal(httpRecordName(report), "2026-12-04-cpu-tiny-64x48x5-2steps-http-abcdef1.json");
    const path = await recordHttpBench(report, records);
    const back = await readHttpRaw(path);
    assert.deepEqual(back.figures, raw.figures);
    assert.match(formatHttpBench(report), /new prompt\s+\d+\.\d ms/);
  });

  test("a server that is not there is an error, not a hang", async () => {
    const spec = httpBenchSpec({ url: "http://127.0.0.1:9", runs: 1 }, PROVENANCE);
    await assert.rejects(runHttpBench(spec), /fetch failed|ECONNREFUSED/);
  });
});
