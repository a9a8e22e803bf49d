/**
 * Runs one of the system's media tools (ffmpeg, ffprobe) and collects its output. A missing tool or
 * a failed run is a MEDIA_TOOL_FAILED error carrying the tool's own last words.
 */
import { execFile } from "node:child_process";
import { KinoError } from "../errors.ts";

export interface ExecResult {
  readonly stdout: string;
  readonly stderr: string;
}

export function execTool(tool: string, args: readonly string[], signal?: AbortSignal): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    execFile(tool, args, { maxBuffer: 64 * 1024 * 1024, signal }, (error, stdout, stderr) => {
      if (error === null) return resolve({ stdout, stderr });
      if ((error as NodeJS.ErrnoException).code === "ENOENT") {
        return reject(new KinoError("MEDIA_TOOL_FAILED", `${tool} is not installed (not found on PATH)`, { cause: error }));
      }
      if (error.name === "AbortError") return reject(error);
      const last = stderr.trim().split("\n").slice(-5).join("\n");
      reject(new KinoError("MEDIA_TOOL_FAILED", `${tool} failed: ${last || error.message}`, { cause: error }));
    });
  });
}

/** The first line of `<tool> -version`, e.g. "ffmpeg version 5.1.9-0+deb12u1 …", trimmed to the version. */
export async function toolVersion(tool: string): Promise<string> {
  const { stdout } = await execTool(tool, ["-version"]);
  const match = /version (\S+)/.exec(stdout);
  return match?.[1] ?? stdout.split("\n")[0] ?? "";
}
