/**
 * Who may talk to the server, checked before any route runs:
 *
 * - a server bound to a loopback address answers only requests whose Host is a loopback name, so a
 *   web page cannot reach it through DNS rebinding (its Host would be the page's domain);
 * - a state-changing request (POST, PUT, PATCH, DELETE) from a browser page of another origin (its
 *   Origin header, or Sec-Fetch-Site: cross-site) is refused: no page can submit or cancel jobs on
 *   the user's behalf. The server sends no CORS headers, so other origins cannot read answers either;
 * - with an API key, every request but the public ones must carry `Authorization: Bearer <key>`
 *   (compared in constant time).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import type { FastifyReply, FastifyRequest } from "fastify";
import { KinoError } from "../../errors.ts";
import { isLoopbackHost } from "../options.ts";

export interface SecurityOptions {
  readonly apiKey: string | null;
  /** The server listens on a loopback address only. */
  readonly loopback: boolean;
}

const STATE_CHANGING = new Set(["POST", "PUT", "PATCH", "DELETE"]);

export function securityHook(options: SecurityOptions) {
  const expected = options.apiKey === null ? null : digest(options.apiKey);
  return async (request: FastifyRequest, reply: FastifyReply): Promise<void> => {
    const host = request.headers.host ?? "";
    if (options.loopback && !isLoopbackHost(hostname(host))) {
      throw new KinoError("UNTRUSTED_HOST", `this server answers on its loopback address only; the request named the host "${host.slice(0, 100)}"`, {
        field: "Host",
      });
    }
    if (STATE_CHANGING.has(request.method)) checkSameOrigin(request, host);
    if (expected !== null && request.routeOptions.config?.public !== true) {
      const match = /^Bearer\s+(\S+)\s*$/i.exec(request.headers.authorization ?? "");
      if (match === null || !timingSafeEqual(digest(match[1]!), expected)) {
        void reply.header("WWW-Authenticate", 'Bearer realm="kino"');
        throw new KinoError("UNAUTHORIZED", match === null ? "this server needs an API key" : "the API key is wrong", { field: "Authorization" });
      }
    }
  };
}

function checkSameOrigin(request: FastifyRequest, host: string): void {
  const origin = request.headers.origin;
  if (origin !== undefined) {
    let originHost: string | null = null;
    try {
      originHost = new URL(origin).host;
    } catch {
      // "null" (a sandboxed page, a file) or garbage: not this server.
    }
    if (originHost === null || originHost.toLowerCase() !== host.toLowerCase()) {
      throw new KinoError("CROSS_ORIGIN", `a page of ${origin.slice(0, 100)} may not change anything on this server (cross-origin request refused)`, {
        field: "Origin",
      });
    }
  } else if (request.headers["sec-fetch-site"] === "cross-site") {
    throw new KinoError("CROSS_ORIGIN", "a page of another site may not change anything on this server (cross-origin request refused)", {
      field: "Origin",
    });
  }
}

function hostname(host: string): string {
  try {
    return new URL(`http://${host}`).hostname;
  } catch {
    return "";
  }
}

/** Fixed-length digests, so the comparison takes the same time whatever the key's length. */
function digest(key: string): Buffer {
  return createHash("sha256").update(key).digest();
}
