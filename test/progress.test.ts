/** The progress display: plain lines off a terminal, a redrawn line on one, s/step and ETA from the steps. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ProgressReporter } from "../src/cli/progress.ts";
import type { EngineEvent } from "../src/protocol/engine.ts";

const step = (i: number, n: number, ms: number): EngineEvent => ({ kind: "step", i, n, ms, vramBytes: null, ramBytes: 1 });
const phase = (p: "denoise" | "decode", state: "start" | "end", ms: number | null = null): EngineEvent => ({ kind: "phase", phase: p, state, ms });

test("off a terminal: one plain line per phase edge and per step, with mean s/step and ETA", () => {
  let out = "";
  const p = new ProgressReporter({ write: (t) => (out += t), tty: false });
  for (const e of [phase("denoise", "start"), step(1, 4, 2000), step(2, 4, 1000), phase("denoise", "end", 3000)]) p.onEvent(e);
  p.notice("kino: a notice");
  assert.equal(
    out,
    ["denoise …", "denoise step 1/4  2.00 s/step  ETA 0:06", "denoise step 2/4  1.50 s/step  ETA 0:03", "denoise done in 3.00 s", "kino: a notice", ""].join("\n"),
  );
});

test("on a terminal: the line is redrawn in place and cleared before notices and at the end", () => {
  let out = "";
  const p = new ProgressReporter({ write: (t) => (out += t), tty: true, columns: 80 });
  p.onEvent(phase("denoise", "start"));
  p.onEvent(step(1, 2, 500));
  assert.match(out, /\r\x1b\[Kdenoise █+░+ 1\/2 {2}0\.50 s\/step {2}ETA 0:01$/);
  p.notice("hello");
  assert.ok(out.endsWith("\r\x1b[Khello\n"), "the redrawn line is cleared before a notice");
  p.onEvent(step(2, 2, 500));
  p.finish();
  assert.ok(out.endsWith("\r\x1b[K"), "finish clears the line");
  assert.ok(out.split("\n").every((l) => l.length < 400));
});
