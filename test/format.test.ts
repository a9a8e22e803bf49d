/** How errors reach the user: the flag, the message, the code, a hint, the engine's stderr where it helps, a stack only with --debug. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { flagOf, formatError } from "../src/cli/format.ts";
import { ERROR_CODES, KinoError, toKinoError } from "../src/errors.ts";
import { EngineErrorCode } from "../src/protocol/engine.ts";

test("fields show as the flags that set them; protocol paths stay as they are", () => {
  assert.equal(flagOf("framesDir"), "--frames-dir");
  assert.equal(flagOf("negativePrompt"), "--negative-prompt");
  assert.equal(flagOf("out"), "--out");
  assert.equal(flagOf("job.output.video"), "job.output.video");
});

test("a crash shows the engine's stderr tail; a refused request does not, unless --debug", () => {
  const crash = new KinoError("ENGINE_CRASHED", "the engine process exited with code 1 during generate", { stderrTail: "Traceback\nRuntimeError: x" });
  const shown = formatError(crash, false);
  assert.match(shown, /^kino: the engine process exited with code 1 during generate \[ENGINE_CRASHED\]\n/);
  assert.match(shown, /engine stderr \(last lines\):\n {4}Traceback\n {4}RuntimeError: x\n/);
  assert.doesNotMatch(shown, /at /, "no stack trace");

  const refused = new KinoError("BAD_CHECKPOINT", "x.safetensors is truncated", { field: "model", phase: "load", stderrTail: "Traceback" });
  const plain = formatError(refused, false);
  assert.match(plain, /^kino: --model: x\.safetensors is truncated \(during load\) \[BAD_CHECKPOINT\]\n {2}hint: /);
  assert.doesNotMatch(plain, /Traceback/);
  const debug = formatError(refused, true);
  assert.match(debug, /Traceback/);
  assert.match(debug, /KinoError: x\.safetensors is truncated\n {4}at /, "the stack with --debug");
});

test("every engine error code is in the catalog; exit codes: 2 refused, 1 failed, 130 cancelled", () => {
  for (const code of EngineErrorCode.options) assert.ok(code in ERROR_CODES, code);
  assert.equal(new KinoError("INVALID_ARGUMENT", "x").exitCode, 2);
  assert.equal(new KinoError("ENGINE_CRASHED", "x").exitCode, 1);
  assert.equal(new KinoError("CANCELLED", "x").exitCode, 130);
  assert.equal(new KinoError("OOM", "x").httpStatus, 507);
  assert.equal(toKinoError(new Error("boom")).code, "INTERNAL");
});
