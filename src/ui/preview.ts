/**
 * The followed job's latest preview in its card: the image its latest `preview` event points at,
 * fetched with the API client (so the key travels in a header) and shown from a blob: URL, the
 * previous one revoked. CSS scales it up to the card's width with its aspect ratio (the latents'
 * resolution is a few dozen pixels a side). It stays after the job ends, until another job is followed.
 */
import type { Api } from "./api.ts";
import type { Preview } from "./job-state.ts";

export class PreviewPane {
  readonly #api: Api;
  readonly #figure: HTMLElement;
  readonly #image: HTMLImageElement;
  readonly #label: HTMLElement;
  /** The latest preview asked for (events are fresh objects: a new one is a new preview). */
  #last: Preview | null = null;
  /** Previews asked for so far, and the number of the one shown: an older one that arrives later is dropped. */
  #asked = 0;
  #shownNumber = 0;
  /** The blob: URL shown now. */
  #shown: string | null = null;
  #fetches = new AbortController();

  constructor(api: Api, figure: HTMLElement) {
    this.#api = api;
    this.#figure = figure;
    this.#image = figure.querySelector("img")!;
    this.#label = figure.querySelector("figcaption")!;
  }

  /** Shows this preview once its image is fetched (nothing changes if it is the one shown or coming). */
  show(preview: Preview): void {
    if (preview === this.#last) return;
    this.#last = preview;
    const number = ++this.#asked;
    const signal = this.#fetches.signal;
    this.#api.objectUrl(preview.url, signal).then(
      (url) => {
        if (signal.aborted || number < this.#shownNumber) return URL.revokeObjectURL(url);
        if (this.#shown !== null) URL.revokeObjectURL(this.#shown);
        this.#shown = url;
        this.#shownNumber = number;
        // The attributes give the image its aspect ratio; CSS gives it the card's width.
        this.#image.width = preview.width;
        this.#image.height = preview.height;
        this.#image.src = url;
        this.#label.textContent = `step ${preview.step}/${preview.total} preview`;
        this.#figure.hidden = false;
      },
      (err: unknown) => {
        // A preview is a convenience: the next one may arrive; the job goes on either way.
        if (!signal.aborted) console.warn(`preview ${preview.url}: ${String(err)}`);
      },
    );
  }

  /** Hides the preview and forgets it (another job is followed). */
  clear(): void {
    this.#fetches.abort();
    this.#fetches = new AbortController();
    this.#last = null;
    this.#figure.hidden = true;
    this.#image.removeAttribute("src");
    this.#label.textContent = "";
    if (this.#shown !== null) URL.revokeObjectURL(this.#shown);
    this.#shown = null;
  }
}
