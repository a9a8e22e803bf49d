/**
 * A job's server-sent events, read with fetch (so the API key travels in a header, which EventSource
 * cannot send) and parsed with eventsource-parser. A dropped stream is resumed after the last event
 * seen (Last-Event-ID), as a browser's EventSource would; the stream ends after the terminal event.
 */
import { EventSourceParserStream } from "eventsource-parser/stream";
import type { JobEvent } from "../server/schemas.ts";
import { ApiError, type Api } from "./api.ts";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const RETRY_MS = 1000;

/** Resolves after the job's terminal event, or when `signal` aborts. @throws ApiError for a 4xx answer */
export async function followJob(api: Api, id: string, onEvent: (event: JobEvent) => void, signal: AbortSignal): Promise<void> {
  let last = 0;
  while (!signal.aborted) {
    try {
      const res = await api.fetch(`/api/jobs/${id}/events`, {
        signal,
        headers: { accept: "text/event-stream", ...(last > 0 ? { "last-event-id": String(last) } : {}) },
      });
      // A client error (no such job, a wrong key) will not mend itself by retrying.
      if (res.status >= 400 && res.status < 500) throw new ApiError(res.status, (await res.json()).error);
      if (!res.ok || res.body === null) throw new Error(`HTTP ${res.status}`);
      const events = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
      for await (const message of events) {
        const event = JSON.parse(message.data) as JobEvent;
        last = event.seq;
        onEvent(event);
        if (TERMINAL.has(event.data.type)) return;
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError) throw err;
      console.warn(`events of job ${id}: ${String(err)}; reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}
