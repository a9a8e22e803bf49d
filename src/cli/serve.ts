/**
 * `kino serve`: flags → ServeOptions → buildServer → listen, until Ctrl-C or SIGTERM, then a
 * graceful shutdown (running jobs are stopped and requeued, engines closed).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Command } from "commander";
import { probeCacheFor, probingFactory } from "../api/probe.ts";
import type { KinoConfig } from "../config/config.ts";
import { SubprocessEngine } from "../engine/subprocess.ts";
import { KinoError } from "../errors.ts";
import { createLogger } from "../log.ts";
import { DEFAULT_BATCH_WINDOW_MS, DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_PORT, DEFAULT_QUEUE_SIZE, redactUrl, resolveServeOptions, type ServeFlags } from "../server/options.ts";
import type { SlotEngineFactory } from "../server/scheduler/slot.ts";
import type { CliContext } from "./context.ts";

export function serveCommand(ctx: CliContext): Command {
  return new Command("serve")
    .description("run kino as a service: a durable job queue, warm engines (one per GPU), an HTTP API (GET /openapi.json)")
    .option("--host <address>", `address to listen on; anything but loopback needs an API key (default: ${DEFAULT_HOST})`)
    .option("--port <n>", `port to listen on; 0 picks a free one (default: ${DEFAULT_PORT})`)
    .option("--api-key <key>", "require Authorization: Bearer <key> (prefer $KINO_API_KEY: a flag shows in ps)")
    .option("--queue-size <n>", `jobs waiting at most; more are answered 429 (default: ${DEFAULT_QUEUE_SIZE})`)
    .option("--max-batch <n>", `waiting jobs of one shape run as one batch, this many at most, as the GPU's plan has room; 1: never (default: ${DEFAULT_MAX_BATCH})`)
    .option("--batch-window <ms>", `a request that finds an engine idle waits this long for others of its shape, so requests sent together run as one batch; 0: never waits (default: ${DEFAULT_BATCH_WINDOW_MS})`)
    .option("--keep-alive <duration>", "how long a model stays loaded after its last job: 5m, 30s, 0, -1 for ever (default: 5m)")
    .option("--data-dir <dir>", "the job database and the videos (default: $KINO_DATA_DIR or ~/.kino/data)")
    .option("--queue <redis-url>", "share jobs with other kino serve nodes through Redis (redis://host:6379): any node takes them, any node answers for them")
    .option("--compile", "engines compile the transformer's blocks (torch.compile, kernels kept in kino's cache): faster steps; each new shape pays for it once per process, unless prewarmed")
    .option(
      "--prewarm <model[:WxHxF][:random],…>",
      "as the server starts, every engine loads these (e.g. wan2.1-t2v-1.3b:832x480x81; :random for the architecture with random weights, as benchmark jobs ask) with the plan a job of that shape gets and runs a forward at it (with --compile, at each batch size --max-batch allows), so the first request pays no load or compile; pair it with --keep-alive -1 to keep them loaded",
    )
    .action(async (flags: ServeFlags) => {
      const options = resolveServeOptions(ctx.config, flags, ctx.cwd);
      // Decisions (engines up, keep-alive, requeues) are worth seeing on a server's console.
      const logger = createLogger(ctx.io.stderr, ctx.debug ? "debug" : "info");
      const { buildServer } = await loadServer();
      const { openaiRoutes } = await import("../server/openai/routes.ts");
      const { uiRoutes } = await import("../server/ui-routes.ts");
      const shared = options.queue === null ? null : await (await import("../server/redis/connect.ts")).connectRedis(options.queue, { logger });
      const server = await buildServer({
        config: ctx.config,
        options,
        // Each GPU model is measured once (kino probe's cache); the server plans with its rates.
        startEngine: probingFactory(engineFactory(ctx, logger), { cache: probeCacheFor(ctx.config, logger), logger }),
        makeTiny: (dir) => ctx.tools.makeTiny(dir, undefined, { logger }),
        logger,
        ...(shared === null ? {} : { store: shared.store, sharedQueue: shared.queue }),
        routes: [openaiRoutes, uiRoutes({ dir: join(ctx.config.repoRoot, "dist", "ui") })],
        version: packageVersion(ctx.config),
      }).catch(async (err: unknown) => {
        // The server owns the shared store and queue once built; until then they are closed here.
        await Promise.all([shared?.queue.close(), shared?.store.close()]);
        throw err;
      });
      const stop = new AbortController();
      const onTerm = () => stop.abort();
      process.once("SIGTERM", onTerm);
      try {
        const url = await server.listen();
        const queue = options.queue === null ? "" : `; jobs shared through ${redactUrl(options.queue)}`;
        ctx.io.stderr(`kino serve: listening on ${url} (data in ${options.dataDir}${queue}; API: ${url}/openapi.json; Ctrl-C stops)\n`);
        const signal = AbortSignal.any([ctx.signal, stop.signal]);
        await new Promise<void>((resolve) => (signal.aborted ? resolve() : signal.addEventListener("abort", () => resolve(), { once: true })));
        ctx.io.stderr("kino serve: shutting down (running jobs go back to the queue)\n");
      } finally {
        process.off("SIGTERM", onTerm);
        await server.close();
      }
    });
}

/** The CLI's engine where it needs no pinning (the CPU, one GPU); a worker pinned to its GPU otherwise. */
function engineFactory(ctx: CliContext, logger: ReturnType<typeof createLogger>): SlotEngineFactory {
  return (placement) => {
    if (placement.gpu === null) return ctx.startEngine();
    const pinned: KinoConfig = { ...ctx.config, childEnv: Object.freeze({ ...ctx.config.childEnv, CUDA_VISIBLE_DEVICES: String(placement.gpu) }) };
    return SubprocessEngine.start(pinned, logger);
  };
}

/**
 * The server is loaded when `serve` runs, not with the CLI: it needs node:sqlite, which Node 22 has
 * without a flag only from 22.13, and the other commands should not pay for (or fail on) it.
 */
async function loadServer(): Promise<typeof import("../server/app.ts")> {
  try {
    return await import("../server/app.ts");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ERR_UNKNOWN_BUILTIN_MODULE") throw err;
    throw new KinoError("NODE_TOO_OLD", `kino serve keeps its jobs with node:sqlite, which Node ${process.versions.node} does not have without a flag`, {
      cause: err,
    });
  }
}

function packageVersion(config: KinoConfig): string {
  try {
    return (JSON.parse(readFileSync(join(config.repoRoot, "package.json"), "utf8")) as { version: string }).version;
  } catch {
    return "unknown";
  }
}
