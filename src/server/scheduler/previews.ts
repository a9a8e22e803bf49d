/**
 * A job's previews as it denoises: each engine `preview` event becomes a PNG at
 * <dataDir>/jobs/<id>/previews/<step>.png, written under a temporary name and renamed (nothing
 * half-written is ever served), then the job's `preview` event, whose url serves that file. Writes
 * and events go one after another, in the order the engine sent them. A preview that cannot be
 * written is logged and announced to no one: the job runs on without it.
 */
import { mkdir, rename, rm, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { toKinoError } from "../../errors.ts";
import type { Logger } from "../../log.ts";
import type { EngineEvent } from "../../protocol/engine.ts";
import { previewFile } from "../jobs/files.ts";
import type { JobJournal } from "../jobs/journal.ts";
import { previewUrl } from "../jobs/view.ts";

type PreviewEvent = Extract<EngineEvent, { kind: "preview" }>;

export interface PreviewDeps {
  readonly journal: JobJournal;
  readonly dataDir: string;
  readonly logger: Logger;
}

export class PreviewRecorder {
  readonly #id: string;
  readonly #deps: PreviewDeps;
  /** The previews added so far, each written and announced after the one before; never rejects. */
  #chain: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(jobId: string, deps: PreviewDeps) {
    this.#id = jobId;
    this.#deps = deps;
  }

  /** Queues a preview to write and announce; ignored once closed. */
  add(event: PreviewEvent): void {
    if (this.#closed) return;
    this.#chain = this.#chain.then(() => this.#record(event));
  }

  /**
   * Takes no more previews and resolves once those added are written and announced (or given up).
   * Call it before recording how the job ended, so its last preview comes before its terminal event,
   * and before removing its folder, so no late write recreates it.
   */
  close(): Promise<void> {
    this.#closed = true;
    return this.#chain;
  }

  async #record(e: PreviewEvent): Promise<void> {
    const { journal, dataDir, logger } = this.#deps;
    const id = this.#id;
    let partial: string | null = null;
    try {
      const path = previewFile(dataDir, id, e.i);
      partial = `${path}.partial`;
      await mkdir(dirname(path), { recursive: true });
      await writeFile(partial, Buffer.from(e.png, "base64"));
      await rename(partial, path);
    } catch (err) {
      logger.warn(`job ${id}: could not write the preview of step ${e.i}: ${toKinoError(err).message}`);
      if (partial !== null) await rm(partial, { force: true }).catch(() => {});
      return;
    }
    const event = { type: "preview", step: e.i, total: e.n, width: e.width, height: e.height, url: previewUrl(id, e.i) } as const;
    await journal.note(id, event).catch((err: unknown) => logger.warn(`job ${id}: could not record the preview of step ${e.i}: ${toKinoError(err).message}`));
  }
}
