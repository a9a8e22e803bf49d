/**
 * Every bad `kino generate` request is refused with exit status 2 and a message naming the flag and
 * the fix, before any engine starts (the test context counts engine starts).
 */
import assert from "node:assert/strict";
import { mkdirSync, readdirSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { writeFakeCheckpoint } from "./fixtures/checkpoint.ts";
import { runKino } from "./fixtures/cli.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

let home: string;
let ckpt: string;
before(() => {
  home = tempDir("kino-cli-validation-");
  ckpt = writeFakeCheckpoint(join(home, "ckpt"));
  writeFakeCheckpoint(join(home, "no-vae"), { omit: ["vae"] });
  const broken = writeFakeCheckpoint(join(home, "broken"));
  truncateSync(join(broken, "text_encoder", "model.safetensors"), 20);
  writeFakeCheckpoint(join(home, "sdxl"), { pipeline: "StableDiffusionXLPipeline" });
  mkdirSync(join(home, "not-a-checkpoint"));
  writeFileSync(join(home, "a-file"), "x");
  mkdirSync(join(home, "folder.mp4"));
  mkdirSync(join(home, "full-frames"));
  writeFileSync(join(home, "full-frames", "frame_00000.png"), "x");
});
after(() => removeDir(home));

interface Row {
  /** Flags added to a valid request (later flags win). */
  readonly args: readonly string[];
  /** The flag the message must name. */
  readonly flag: string;
  /** What the message must say: the problem and the fix. */
  readonly says: RegExp;
  readonly code?: string;
}

const rows: readonly Row[] = [
  { args: ["--size", "832"], flag: "--size", says: /must be WIDTHxHEIGHT, e\.g\. 832x480; got "832"/ },
  { args: ["--size", "833x480"], flag: "--size", says: /not a multiple of 16.*nearest legal size: 832x480/ },
  { args: ["--size", "1000x700"], flag: "--size", says: /nearest legal size: 1008x704/ },
  { args: ["--size", "0x480"], flag: "--size", says: /nearest legal size: 16x480/ },
  { args: ["--frames", "80"], flag: "--frames", says: /must be 4k\+1.*got 80, nearest: 81/ },
  { args: ["--frames", "19"], flag: "--frames", says: /got 19, nearest: 21/ },
  { args: ["--frames", "0"], flag: "--frames", says: /must be a whole number ≥ 1/ },
  { args: ["--frames", "abc"], flag: "--frames", says: /must be a number; got "abc"/ },
  { args: ["--frames", "8.5"], flag: "--frames", says: /must be a whole number; got "8\.5"/ },
  { args: ["--steps", "0"], flag: "--steps", says: /must be a whole number ≥ 1/ },
  { args: ["--guidance", "-1"], flag: "--guidance", says: /must be ≥ 0.*got -1/ },
  { args: ["--shift", "0"], flag: "--shift", says: /must be > 0.*got 0/ },
  { args: ["--shift", "-2"], flag: "--shift", says: /must be > 0/ },
  { args: ["--seed", "-1"], flag: "--seed", says: /must be a whole number from 0 to 4294967295/ },
  { args: ["--fps", "0"], flag: "--fps", says: /must be a number above 0/ },
  { args: ["--prompt", "  "], flag: "--prompt", says: /is empty; describe the video/ },
  { args: ["--model", "wan9"], flag: "--model", says: /unknown model "wan9"; known ids: tiny, wan2\.1-t2v-1\.3b, wan2\.1-t2v-14b/, code: "UNKNOWN_MODEL" },
  { args: ["--model", "wan2.1-t2v-1.3b"], flag: "--model", says: /wan2\.1-t2v-1\.3b is not downloaded.*kino models pull wan2\.1-t2v-1\.3b/, code: "MODEL_NOT_DOWNLOADED" },
  { args: ["--model", "./not-a-checkpoint"], flag: "--model", says: /not a diffusers checkpoint folder: model_index\.json is missing/, code: "NOT_A_CHECKPOINT" },
  { args: ["--model", "./no-vae"], flag: "--model", says: /the component folder vae\/ is missing/, code: "NOT_A_CHECKPOINT" },
  { args: ["--model", "./a-file"], flag: "--model", says: /it is a file, not a folder/, code: "NOT_A_CHECKPOINT" },
  { args: ["--model", "./missing-folder"], flag: "--model", says: /it does not exist/, code: "NOT_A_CHECKPOINT" },
  { args: ["--model", "./sdxl"], flag: "--model", says: /holds a StableDiffusionXLPipeline; kino runs WanPipeline/, code: "UNSUPPORTED_MODEL" },
  { args: ["--model", "./broken"], flag: "--model", says: /text_encoder\/model\.safetensors is not a valid safetensors file/, code: "BAD_CHECKPOINT" },
  { args: ["--random-weights", "--model", "auto"], flag: "--random-weights", says: /need a catalog model named explicitly/ },
  { args: ["--random-weights", "--model", "tiny"], flag: "--random-weights", says: /tiny has none/ },
  { args: ["--random-weights", "--model", "./ckpt"], flag: "--random-weights", says: /not a folder/ },
  { args: ["--out", "video.avi"], flag: "--out", says: /must be a file path ending in \.mp4; got "video\.avi"/ },
  { args: ["--out", "no/such/dir/v.mp4"], flag: "--out", says: /the folder .*no\/such\/dir does not exist; create it first/ },
  { args: ["--out", "folder.mp4"], flag: "--out", says: /folder\.mp4 is a folder; give a file path ending in \.mp4/ },
  { args: ["--frames-dir", "full-frames"], flag: "--frames-dir", says: /full-frames is not empty \(1 entries\); give a new or empty folder/ },
  { args: ["--frames-dir", "a-file"], flag: "--frames-dir", says: /a-file is a file; give a folder/ },
  { args: ["--frames-dir", "no/such/frames"], flag: "--frames-dir", says: /the folder .*no\/such does not exist/ },
];

describe("kino generate refuses bad input with exit 2, naming the flag, before any engine starts", () => {
  for (const row of rows) {
    test(`${row.args.join(" ")} → ${row.flag}`, async () => {
      const r = await runKino(["generate", "--model", "./ckpt", "--prompt", "a fox", "--out", "out.mp4", ...row.args], { home });
      assert.equal(r.code, 2, `exit status 2; stderr: ${r.stderr}`);
      assert.equal(r.starts, 0, "no engine was started");
      assert.ok(r.stderr.startsWith(`kino: ${row.flag}: `), `the message names ${row.flag}: ${r.stderr}`);
      assert.match(r.stderr, row.says);
      assert.match(r.stderr, new RegExp(`\\[${row.code ?? "INVALID_ARGUMENT"}\\]`));
      assert.equal(r.stdout, "", "nothing on stdout");
      assert.ok(!r.stderr.includes("    at "), "no stack trace");
    });
  }

  for (const [args, says] of [
    [["--device", "gpu"], /option '--device <device>' argument 'gpu' is invalid\. Allowed choices are cuda, cpu/],
    [["--dtype", "int4"], /option '--dtype <dtype>' argument 'int4' is invalid/],
    [["--frobnicate"], /unknown option '--frobnicate'/],
  ] as const) {
    test(`${args.join(" ")} is refused by the parser with exit 2`, async () => {
      const r = await runKino(["generate", "--model", "./ckpt", "--prompt", "a fox", "--out", "out.mp4", ...args], { home });
      assert.equal(r.code, 2);
      assert.equal(r.starts, 0);
      assert.match(r.stderr, says);
    });
  }

  test("a missing --prompt or --out is refused by the parser with exit 2", async () => {
    const noPrompt = await runKino(["generate", "--out", "out.mp4"], { home });
    assert.equal(noPrompt.code, 2);
    assert.match(noPrompt.stderr, /required option '--prompt <text>' not specified/);
    const noOut = await runKino(["generate", "--prompt", "x"], { home });
    assert.equal(noOut.code, 2);
    assert.match(noOut.stderr, /required option '--out <file\.mp4>' not specified/);
  });

  test("with --json, a refused request prints one error object on stdout", async () => {
    const r = await runKino(["generate", "--model", "./ckpt", "--prompt", "a fox", "--out", "out.mp4", "--frames", "80", "--json"], { home });
    assert.equal(r.code, 2);
    const lines = r.stdout.trim().split("\n");
    assert.equal(lines.length, 1);
    assert.deepEqual(JSON.parse(lines[0]!), {
      ok: false,
      error: { code: "INVALID_ARGUMENT", message: JSON.parse(lines[0]!).error.message, field: "frames", phase: null },
    });
    assert.match(JSON.parse(lines[0]!).error.message, /nearest: 81/);
  });

  test("nothing was written by any refused request", () => {
    assert.deepEqual(
      readdirSync(home).filter((f) => f.endsWith(".mp4") && !statSync(join(home, f)).isDirectory()),
      [],
    );
  });
});

test("unknown commands exit 2; --help and --version exit 0", async () => {
  const unknown = await runKino(["frobnicate"], { home });
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command 'frobnicate'/);
  const help = await runKino(["generate", "--help"], { home });
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--frames-dir <dir>/);
  const version = await runKino(["--version"], { home });
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^\d+\.\d+\.\d+\n$/);
});
