/**
 * `kino doctor`: what this machine has of what kino needs, each missing item with its fix. It starts
 * the engine once (hello reports Python, torch, CUDA, the GPUs and the video encoder) and asks the
 * system's ffmpeg/ffprobe for their versions.
 */
import { constants } from "node:fs";
import { access } from "node:fs/promises";
import type { KinoConfig } from "../config/config.ts";
import type { EngineFactory } from "../engine/client.ts";
import { toKinoError } from "../errors.ts";
import { toolVersion } from "../media/exec.ts";
import type { HelloResult } from "../protocol/engine.ts";
import { listModels } from "./models.ts";

export type CheckStatus = "ok" | "warn" | "missing";

export interface DoctorCheck {
  readonly name: string;
  readonly status: CheckStatus;
  readonly detail: string;
  /** What to do about it, for warn and missing. */
  readonly fix: string | null;
  /** A missing required item makes doctor fail. */
  readonly required: boolean;
}

export interface DoctorReport {
  readonly ok: boolean;
  readonly checks: readonly DoctorCheck[];
  readonly hello: HelloResult | null;
}

export interface DoctorDeps {
  readonly config: KinoConfig;
  readonly startEngine: EngineFactory;
  /** @default process.versions.node */
  readonly nodeVersion?: string;
  /** @default "ffmpeg" / "ffprobe" */
  readonly ffmpeg?: string;
  readonly ffprobe?: string;
}

export const MIN_NODE_MAJOR = 22;
const GiB = 1024 ** 3;

export async function runDoctor(deps: DoctorDeps): Promise<DoctorReport> {
  const { config } = deps;
  const checks: DoctorCheck[] = [];
  const add = (name: string, status: CheckStatus, detail: string, fix: string | null = null, required = true) =>
    checks.push({ name, status, detail, fix: status === "ok" ? null : fix, required });
  const setup = config.pythonFromEnv ? "point KINO_PYTHON at a Python with engine/requirements.lock installed" : "run scripts/setup.sh";

  const node = deps.nodeVersion ?? process.versions.node;
  const nodeOk = Number(node.split(".")[0]) >= MIN_NODE_MAJOR;
  add("node", nodeOk ? "ok" : "missing", node, `kino needs Node ≥ ${MIN_NODE_MAJOR}; run scripts/setup.sh`);

  const pythonOk = await access(config.python, constants.X_OK).then(() => true, () => false);
  add("python env", pythonOk ? "ok" : "missing", config.python + (pythonOk ? "" : " (not found)"), setup);

  let hello: HelloResult | null = null;
  if (pythonOk) {
    try {
      const engine = await deps.startEngine();
      try {
        hello = await engine.hello();
      } finally {
        await engine.close();
      }
    } catch (err) {
      const e = toKinoError(err);
      const tail = e.stderrTail?.trim().split("\n").slice(-3).join(" | ");
      add("engine", "missing", `the engine does not start: ${e.message}${tail ? ` (${tail})` : ""}`, setup);
    }
  }
  if (hello !== null) {
    add("engine", "ok", `kino_engine ${hello.engineVersion}, protocol ${hello.protocol}, Python ${hello.python}`);
    add("torch", "ok", `${hello.torch} (diffusers ${hello.diffusers}, transformers ${hello.transformers})`);
    add("cuda", hello.cuda !== null ? "ok" : "warn", hello.cuda !== null ? `torch built with CUDA ${hello.cuda}` : "torch is a CPU-only build", "install a CUDA build of torch (scripts/setup.sh on a machine with a GPU)", false);
    if (hello.devices.length === 0) {
      add("gpu", "warn", "no CUDA GPU visible: kino runs on the CPU (slow; the tiny model is fine)", "check nvidia-smi and the driver", false);
    }
    for (const d of hello.devices) {
      add(`gpu ${d.index}`, "ok", `${d.name}, ${(d.totalBytes / GiB).toFixed(1)} GiB (${(d.freeBytes / GiB).toFixed(1)} free), compute ${d.capability}`, null, false);
    }
    add("host ram", "ok", `${(hello.hostRamBytes / GiB).toFixed(1)} GiB (${(hello.hostRamAvailableBytes / GiB).toFixed(1)} available)`, null, false);
    const enc = hello.encoder;
    add("encoder", enc.h264 ? "ok" : "missing", `${enc.name} ${enc.version}${enc.h264 ? " with H.264 (libx264)" : " without H.264"}`, `the video encoder needs libx264; ${setup}`);
  } else if (!pythonOk) {
    add("engine", "missing", "not checked: no Python environment", setup);
  }

  for (const tool of [deps.ffmpeg ?? "ffmpeg", deps.ffprobe ?? "ffprobe"]) {
    const version = await toolVersion(tool).catch(() => null);
    add(tool, version !== null ? "ok" : "missing", version ?? "not found on PATH", "install ffmpeg (scripts/setup.sh does it; or apt-get install ffmpeg)");
  }

  const homeExists = await access(config.home).then(() => true, () => false);
  add("kino home", "ok", `${config.home}${homeExists ? "" : " (created on first use)"}`, null, false);
  for (const m of await listModels(config)) {
    const fix = m.origin === "kino" ? "made on first use of --model tiny (or kino models make-tiny DIR)" : `kino models pull ${m.id}`;
    add(`model ${m.id}`, m.present ? "ok" : "warn", m.present ? m.path : "not present", fix, false);
  }
  return { ok: checks.every((c) => c.status !== "missing" || !c.required), checks, hello };
}
