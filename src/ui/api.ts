/**
 * The page's client of kino's native API: JSON calls with the API key when there is one, errors as
 * ApiError (code, message, field), and media URLs that work with a key (fetched into blob: URLs,
 * since a <video> element cannot send a header).
 */
import type { ErrorInfo } from "../server/schemas.ts";

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly field: string | null;

  constructor(status: number, info: ErrorInfo) {
    super(info.message);
    this.status = status;
    this.code = info.code;
    this.field = info.field;
  }
}

const KEY_STORAGE = "kino.apiKey";

export class Api {
  #key: string | null;

  constructor() {
    this.#key = localStorage.getItem(KEY_STORAGE);
  }

  get hasKey(): boolean {
    return this.#key !== null;
  }

  setKey(key: string | null): void {
    this.#key = key;
    if (key === null) localStorage.removeItem(KEY_STORAGE);
    else localStorage.setItem(KEY_STORAGE, key);
  }

  headers(extra: Record<string, string> = {}): Record<string, string> {
    return this.#key === null ? extra : { ...extra, authorization: `Bearer ${this.#key}` };
  }

  fetch(path: string, init: RequestInit = {}): Promise<Response> {
    return fetch(path, { ...init, headers: this.headers((init.headers ?? {}) as Record<string, string>) });
  }

  /** @throws ApiError with the server's code, message and field */
  async json<T>(method: "GET" | "POST", path: string, body?: unknown): Promise<T> {
    const res = await this.fetch(path, {
      method,
      ...(body === undefined ? {} : { body: JSON.stringify(body), headers: { "content-type": "application/json" } }),
    });
    const answer = (await res.json().catch(() => null)) as { error?: ErrorInfo } | null;
    if (!res.ok) throw new ApiError(res.status, answer?.error ?? { code: "HTTP_ERROR", message: `${method} ${path}: HTTP ${res.status}`, field: null });
    return answer as T;
  }

  /** A URL a <video> or a download link can use: the path itself, or a blob: URL of it when a key is needed. */
  async mediaUrl(path: string): Promise<string> {
    return this.#key === null ? path : this.objectUrl(path);
  }

  /**
   * What the path answers, fetched with the key (when there is one) into a blob: URL; the caller
   * revokes it (URL.revokeObjectURL) once it is no longer shown.
   * @throws ApiError with the server's code and message
   */
  async objectUrl(path: string, signal?: AbortSignal): Promise<string> {
    const res = await this.fetch(path, { signal });
    if (!res.ok) {
      const answer = (await res.json().catch(() => null)) as { error?: ErrorInfo } | null;
      throw new ApiError(res.status, answer?.error ?? { code: "HTTP_ERROR", message: `${path}: HTTP ${res.status}`, field: null });
    }
    return URL.createObjectURL(await res.blob());
  }
}
