/** The gallery: finished jobs, newest first, each with its video (playable) and a download link. */
import type { Job, JobList } from "../server/schemas.ts";
import type { Api } from "./api.ts";
import { formatPerStep } from "./format.ts";

const PAGE = 24;

export class Gallery {
  readonly #api: Api;
  readonly #root: HTMLElement;
  /** Cards by job id, so a refresh adds only new ones (and keeps players that are playing). */
  readonly #cards = new Map<string, HTMLElement>();

  constructor(api: Api, root: HTMLElement) {
    this.#api = api;
    this.#root = root;
  }

  async refresh(): Promise<void> {
    const { jobs } = await this.#api.json<JobList>("GET", `/api/jobs?status=completed&limit=${PAGE}`);
    for (const job of [...jobs].reverse()) {
      if (this.#cards.has(job.id)) continue;
      const card = await this.#card(job);
      this.#cards.set(job.id, card);
      this.#root.prepend(card);
    }
    this.#root.dataset.count = String(this.#cards.size);
  }

  async #card(job: Job): Promise<HTMLElement> {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.job = job.id;
    const url = await this.#api.mediaUrl(`/api/jobs/${job.id}/video`);
    const video = document.createElement("video");
    video.src = url;
    video.controls = true;
    video.loop = true;
    // Muted clips may play on their own: the gallery shows them moving, as a contact sheet.
    video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    video.preload = "auto";
    const caption = document.createElement("figcaption");
    const prompt = document.createElement("p");
    prompt.className = "prompt";
    prompt.textContent = job.params.prompt;
    const meta = document.createElement("p");
    meta.className = "meta";
    const r = job.result;
    meta.textContent =
      `${job.model} · ${job.params.width}x${job.params.height} · ${job.params.frames} frames · ${job.params.steps} steps · seed ${job.params.seed}` +
      (r === null ? "" : ` · ${formatPerStep(r.secondsPerStep)}`) +
      (job.noise ? " · noise (test model)" : "");
    const download = document.createElement("a");
    download.href = url;
    download.download = `kino-${job.id.slice(0, 8)}.mp4`;
    download.textContent = "download";
    download.className = "download";
    caption.append(prompt, meta, download);
    card.append(video, caption);
    return card;
  }
}
