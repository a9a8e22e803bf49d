/**
 * The web UI, served at `/` from the folder Vite builds it into (dist/ui, `npm run build`). Its files
 * answer without the API key (the page asks for the key and sends it with every API call); nothing
 * but the built files is served, under a content security policy that lets the page talk only to
 * this server.
 */
import { existsSync } from "node:fs";
import fastifyStatic from "@fastify/static";
import type { RoutePlugin } from "./app.ts";

/** Scripts and styles from this server only; videos may be blob: URLs (fetched with the key). */
const CSP = [
  "default-src 'self'",
  "script-src 'self'",
  // uPlot sizes its elements with style attributes.
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data: blob:",
  "media-src 'self' blob:",
  "connect-src 'self'",
  "frame-ancestors 'none'",
  "base-uri 'none'",
  "form-action 'none'",
].join("; ");

export interface UiOptions {
  /** The built UI (index.html and assets/). */
  readonly dir: string;
}

export function uiRoutes(options: UiOptions): RoutePlugin {
  return async (app, ctx) => {
    if (!existsSync(options.dir)) {
      ctx.logger.warn(`the web UI is not built (no ${options.dir}); run npm run build to serve it at /`);
      return;
    }
    // Routes of this scope answer without the key; the API routes are outside it.
    app.addHook("onRoute", (route) => {
      route.config = { ...route.config, public: true };
    });
    await app.register(fastifyStatic, {
      root: options.dir,
      prefix: "/",
      // One route per built file, found at start: no other path is looked up on disk.
      wildcard: false,
      index: ["index.html"],
      cacheControl: false,
      setHeaders: (reply, path) => {
        void reply.header("content-security-policy", CSP);
        void reply.header("x-content-type-options", "nosniff");
        // Vite names assets by content hash; the page itself must be fetched fresh to find new ones.
        void reply.header("cache-control", path.endsWith(".html") ? "no-cache" : "public, max-age=31536000, immutable");
      },
    });
  };
}
