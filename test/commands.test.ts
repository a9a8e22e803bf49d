/** `kino doctor` and `kino models` in-process, with the FakeEngine and stand-in tools. */
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { writeFakeCheckpoint } from "./fixtures/checkpoint.ts";
import { runKino } from "./fixtures/cli.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

let home: string;
before(() => {
  home = tempDir("kino-commands-");
});
after(() => removeDir(home));

// Doctor only checks that the interpreter exists before it asks the (fake) engine; node itself will do.
const withPython = { python: process.execPath };

test("doctor: all required present → exit 0; GPU and models are warnings with their fix", async () => {
  const r = await runKino(["doctor"], { home, config: withPython });
  assert.equal(r.code, 0, r.stderr + r.stdout);
  assert.match(r.stdout, /^ok {4}node /m);
  assert.match(r.stdout, /^ok {4}engine +kino_engine fake, protocol 1/m);
  assert.match(r.stdout, /^ok {4}encoder +ffmpeg .* with H\.264/m);
  assert.match(r.stdout, /^warn {2}gpu +no CUDA GPU visible/m);
  assert.match(r.stdout, /^warn {2}model wan2\.1-t2v-1\.3b +not present\n +fix: kino models pull wan2\.1-t2v-1\.3b/m);
  assert.match(r.stdout, /^ok {4}ffprobe /m);
});

test("doctor --json with no Python environment: exit 1, the item missing with the set-up fix", async () => {
  const r = await runKino(["doctor", "--json"], { home, config: { python: join(home, "no-python") } });
  assert.equal(r.code, 1);
  const report = JSON.parse(r.stdout.trim().split("\n")[0]!);
  assert.equal(report.ok, false);
  const python = report.checks.find((c: { name: string }) => c.name === "python env");
  assert.deepEqual([python.status, python.fix], ["missing", "run scripts/setup.sh"]);
  assert.match(r.stderr, /2 required item\(s\) missing: python env, engine .*\[DOCTOR_FAILED\]/);
});

test("models list: text and --json, with what is present", async () => {
  writeFakeCheckpoint(join(home, "models", "tiny"));
  const text = await runKino(["models", "list"], { home });
  assert.equal(text.code, 0);
  assert.match(text.stdout, /^tiny +present +kino's tiny Wan 2\.1/m);
  assert.match(text.stdout, /^wan2\.1-t2v-14b +absent +Wan 2\.1 text-to-video 14B/m);
  assert.match(text.stdout, /not downloaded \(kino models pull wan2\.1-t2v-14b\)/);
  const json = await runKino(["models", "list", "--json"], { home });
  const { models } = JSON.parse(json.stdout);
  assert.deepEqual(models[0], {
    id: "tiny",
    description: models[0].description,
    origin: "kino",
    hubRepo: null,
    path: join(home, "models", "tiny"),
    present: true,
    randomWeights: false,
  });
  assert.equal(models[2].randomWeights, true);
});

test("models pull: downloads the hub repo into $KINO_HOME/models/<id>; tiny and unknown ids are refused", async () => {
  const pulls: [string, string][] = [];
  const pull = async (repo: string, dir: string) => {
    pulls.push([repo, dir]);
    writeFakeCheckpoint(dir, { tiny: false });
    return { ok: true };
  };
  const r = await runKino(["models", "pull", "wan2.1-t2v-1.3b"], { home, tools: { pull } });
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(pulls, [["Wan-AI/Wan2.1-T2V-1.3B-Diffusers", join(home, "models", "wan2.1-t2v-1.3b")]]);
  assert.equal(r.stdout, join(home, "models", "wan2.1-t2v-1.3b") + "\n");
  const again = await runKino(["models", "pull", "wan2.1-t2v-1.3b"], { home, tools: { pull } });
  assert.equal(again.code, 0);
  assert.match(again.stderr, /already in/);
  assert.equal(pulls.length, 1, "a present model is not downloaded again");
  const json = await runKino(["models", "pull", "wan2.1-t2v-1.3b", "--json"], { home, tools: { pull } });
  assert.deepEqual(JSON.parse(json.stdout), { ok: true, id: "wan2.1-t2v-1.3b", path: join(home, "models", "wan2.1-t2v-1.3b"), alreadyPresent: true });

  const tiny = await runKino(["models", "pull", "tiny"], { home, tools: { pull } });
  assert.equal(tiny.code, 2);
  assert.match(tiny.stderr, /tiny is made by kino, not downloaded/);
  const unknown = await runKino(["models", "pull", "sora"], { home, tools: { pull } });
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /^kino: --id: unknown model "sora"; known ids: tiny, wan2\.1-t2v-1\.3b, wan2\.1-t2v-14b \[UNKNOWN_MODEL\]/);
});

test("models pull: a tool failure keeps the tool's code when kino knows it, else TOOL_FAILED with it", async () => {
  const { KinoError } = await import("../src/errors.ts");
  const failing = (code: string) => async () => {
    throw code === "BAD_CHECKPOINT" ? new KinoError("BAD_CHECKPOINT", "x.safetensors is truncated") : new KinoError("TOOL_FAILED", `kino_engine.tools pull: ${code}: no network`);
  };
  const bad = await runKino(["models", "pull", "wan2.1-t2v-14b"], { home, tools: { pull: failing("BAD_CHECKPOINT") } });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /x\.safetensors is truncated \[BAD_CHECKPOINT\]/);
  const net = await runKino(["models", "pull", "wan2.1-t2v-14b"], { home, tools: { pull: failing("NETWORK") } });
  assert.equal(net.code, 1);
  assert.match(net.stderr, /NETWORK: no network \[TOOL_FAILED\]/);
});

test("models make-tiny: says its videos are noise, prints the folder", async () => {
  const made: [string, number | undefined][] = [];
  const makeTiny = async (dir: string, seed: number | undefined) => {
    made.push([dir, seed]);
    mkdirSync(dir, { recursive: true });
    return { ok: true };
  };
  const r = await runKino(["models", "make-tiny", "my-tiny", "--seed", "4"], { home, tools: { makeTiny } });
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(made, [[join(home, "my-tiny"), 4]]);
  assert.match(r.stderr, /random weights .*whatever it generates is noise/);
  assert.equal(r.stdout, join(home, "my-tiny") + "\n");
  assert.ok(existsSync(join(home, "my-tiny")));
  const json = await runKino(["models", "make-tiny", "json-tiny", "--json"], { home, tools: { makeTiny } });
  assert.deepEqual(JSON.parse(json.stdout), { ok: true, path: join(home, "json-tiny"), noise: true });
  const badSeed = await runKino(["models", "make-tiny", "x", "--seed", "-3"], { home, tools: { makeTiny } });
  assert.equal(badSeed.code, 2);
  assert.match(badSeed.stderr, /^kino: --seed: must be a whole number ≥ 0; got -3/);
  assert.equal(made.length, 2, "a bad seed runs nothing");
});
