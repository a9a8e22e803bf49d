/**
 * Server-sent events on a hijacked fastify reply: `id`, `event` and one `data` line of JSON per
 * event, a comment every 15 s so proxies keep the connection, and a set of open streams the server
 * ends when it shuts down.
 */
import type { FastifyReply } from "fastify";

/** Browsers reconnect after this long (ms) when the stream drops; they resend Last-Event-ID. */
const RETRY_MS = 2000;
const HEARTBEAT_MS = 15_000;

export class SseStream {
  readonly #reply: FastifyReply;
  readonly #heartbeat: NodeJS.Timeout;
  #ended = false;

  constructor(reply: FastifyReply) {
    this.#reply = reply;
    reply.hijack();
    reply.raw.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache, no-transform",
      connection: "keep-alive",
      // nginx buffers responses unless told not to.
      "x-accel-buffering": "no",
    });
    reply.raw.write(`retry: ${RETRY_MS}\n\n`);
    this.#heartbeat = setInterval(() => this.#write(": keep-alive\n\n"), HEARTBEAT_MS);
    this.#heartbeat.unref();
    reply.raw.once("close", () => this.end());
  }

  get ended(): boolean {
    return this.#ended;
  }

  /** Resolves when the stream ends (the client left, or `end`). */
  closed(): Promise<void> {
    return new Promise((resolve) => {
      if (this.#ended) resolve();
      else this.#reply.raw.once("close", () => resolve());
    });
  }

  send(id: number, event: string, data: unknown): void {
    this.#write(`id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  }

  end(): void {
    if (this.#ended) return;
    this.#ended = true;
    clearInterval(this.#heartbeat);
    if (!this.#reply.raw.writableEnded) this.#reply.raw.end();
  }

  #write(text: string): void {
    if (!this.#ended && !this.#reply.raw.writableEnded) this.#reply.raw.write(text);
  }
}
