/**
 * `kino serve` as a function: `buildServer(deps)` assembles the job store, the scheduler and its
 * engines, the job service and the fastify app with its routes. Everything it needs is injected
 * (engines, clock, store), so tests run it with FakeEngine or the real subprocess engine, in-process
 * through `app.inject()` or over a real socket after `listen()`.
 *
 * Route modules are fastify plugins over one RouteContext; more (the OpenAI-compatible routes, the
 * web UI) are added through `deps.routes` and share the same job service, validation, security and
 * OpenAPI document.
 */
import { join } from "node:path";
import Fastify, { type FastifyInstance } from "fastify";
import type { KinoConfig } from "../config/config.ts";
import { silentLogger, type Logger } from "../log.ts";
import { systemClock, type Clock } from "./clock.ts";
import { installErrorHandling } from "./http/errors.ts";
import { RouteTable } from "./http/route.ts";
import { securityHook } from "./http/security.ts";
import type { SseStream } from "./http/sse.ts";
import { JobJournal } from "./jobs/journal.ts";
import { recoverInterrupted } from "./jobs/recovery.ts";
import { JobService } from "./jobs/service.ts";
import { SqliteJobStore } from "./jobs/sqlite-store.ts";
import type { SharedQueue } from "./jobs/shared-queue.ts";
import type { JobStore } from "./jobs/store.ts";
import { checkServeOptions, isLoopbackHost, type PrewarmTarget, type ServeOptions } from "./options.ts";
import { prepareSubmission } from "./jobs/prepare.ts";
import { toKinoError } from "../errors.ts";
import type { RouteContext } from "./routes/context.ts";
import { jobRoutes } from "./routes/jobs.ts";
import { planRoutes } from "./routes/plan.ts";
import { previewRoutes } from "./routes/previews.ts";
import { systemRoutes } from "./routes/system.ts";
import { videoRoutes } from "./routes/video.ts";
import { learnedPeaks, PeakLog } from "../planner/learn.ts";
import { Scheduler } from "./scheduler/scheduler.ts";
import type { SlotEngineFactory } from "./scheduler/slot.ts";
import type { MakeTiny } from "./scheduler/tiny-model.ts";

/**
 * `--prewarm`: each target prepared as a job request of that model and shape would be (the same
 * checks, defaults and plan), then warmed on every idle engine, one target after another. A target
 * that cannot be prepared (an unknown model, a size the model refuses) is logged and skipped.
 */
async function prewarmAll(targets: readonly PrewarmTarget[], scheduler: Scheduler, modelsDir: string, logger: Logger): Promise<void> {
  for (const target of targets) {
    try {
      const submission = await prepareSubmission({ ...target, prompt: "prewarm" }, scheduler.machine(), modelsDir);
      await scheduler.prewarm(submission);
    } catch (err) {
      const e = toKinoError(err);
      logger.warn(`prewarm of ${target.model}${target.size === undefined ? "" : ` ${target.size}x${target.frames}`} skipped: ${e.message}${e.field === null ? "" : ` (${e.field})`}`);
    }
  }
}

/** A route module: a fastify plugin over the shared context. */
export type RoutePlugin = (app: FastifyInstance, ctx: RouteContext) => Promise<void>;

export interface ServerDeps {
  readonly config: KinoConfig;
  readonly options: ServeOptions;
  /** Starts the engine of a slot (one per GPU); a plain EngineFactory fits. */
  readonly startEngine: SlotEngineFactory;
  /** Makes kino's tiny checkpoint in a folder (the engine's make-tiny tool). */
  readonly makeTiny: MakeTiny;
  /** @default the system clock */
  readonly clock?: Clock;
  /** @default the sqlite store of `options.dataDir` */
  readonly store?: JobStore;
  /**
   * A queue shared with other nodes (`--queue redis://…`), with `store` shared by them too: jobs
   * submitted to any node run on whichever has an engine free. @default none
   */
  readonly sharedQueue?: SharedQueue;
  /** @default silent */
  readonly logger?: Logger;
  /** More route modules, registered after the native ones. */
  readonly routes?: readonly RoutePlugin[];
  /** @default the package's */
  readonly version?: string;
}

export interface KinoServer {
  readonly app: FastifyInstance;
  readonly service: JobService;
  readonly scheduler: Scheduler;
  readonly store: JobStore;
  /** Listens on the options' host and port; resolves to the URL. */
  listen(): Promise<string>;
  /**
   * Graceful shutdown, idempotent: new jobs are refused, running ones are stopped and requeued, event
   * streams end, the engines and the store close.
   */
  close(): Promise<void>;
}

/**
 * Builds the server: recovers jobs a dead process left running (recovery.ts), queues the stored
 * queued jobs and starts the engines in the background (health says when they are up).
 * @throws KinoError API_KEY_REQUIRED, INVALID_ARGUMENT (options), DATA_DIR_IN_USE
 */
export async function buildServer(deps: ServerDeps): Promise<KinoServer> {
  const { options, config } = deps;
  checkServeOptions(options);
  const clock = deps.clock ?? systemClock;
  const logger = deps.logger ?? silentLogger;
  const store = deps.store ?? SqliteJobStore.open(options.dataDir);
  const journal = new JobJournal(store, clock);
  // Jobs running in a shared store may be running on another node: the shared queue finds the
  // ones whose node died (their lock expires) and the node that takes them recovers them.
  if (deps.sharedQueue === undefined) {
    const recovered = await recoverInterrupted(journal);
    if (recovered.requeued.length + recovered.failed.length > 0) {
      logger.warn(`the last server stopped while jobs ran: ${recovered.requeued.length} requeued, ${recovered.failed.length} failed (interrupted twice)`);
    }
  }
  // Peaks measured by earlier runs on this machine (kino generate's and serve's) correct admission's and the runs' plans.
  await learnedPeaks.attach(new PeakLog(join(config.home, "planner", "peaks.jsonl")));
  const scheduler = new Scheduler({
    journal,
    clock,
    logger,
    startEngine: deps.startEngine,
    makeTiny: deps.makeTiny,
    dataDir: options.dataDir,
    cacheDir: join(config.cache, "runtime"),
    defaultKeepAliveMs: options.keepAliveMs,
    queueSize: options.queueSize,
    maxBatch: options.maxBatch,
    batchWindowMs: options.batchWindowMs ?? 0,
    compile: options.compile ?? false,
    shared: deps.sharedQueue,
  });
  const service = new JobService({ journal, scheduler, modelsDir: config.modelsDir, dataDir: options.dataDir });

  const app = Fastify({ bodyLimit: options.bodyLimitBytes, logger: false });
  // Bodies are JSON: a text body would reach the routes as a string and be refused less clearly.
  app.removeContentTypeParser("text/plain");
  installErrorHandling(app, logger, options.bodyLimitBytes);
  app.addHook("onRequest", securityHook({ apiKey: options.apiKey, loopback: isLoopbackHost(options.host) }));
  app.addHook("onResponse", async (request, reply) => logger.debug(`${request.method} ${request.url} → ${reply.statusCode}`));
  const streams = new Set<SseStream>();
  const ctx: RouteContext = { service, scheduler, table: new RouteTable(), streams, logger };
  const info = {
    title: "kino",
    version: deps.version ?? "0",
    description: "kino's native API: video generation jobs, their events and videos, the engines.",
  };
  await app.register(jobRoutes, ctx);
  await app.register(videoRoutes, ctx);
  await app.register(previewRoutes, ctx);
  await app.register(planRoutes, ctx);
  await app.register(systemRoutes, { ...ctx, info });
  for (const plugin of deps.routes ?? []) await app.register(plugin, ctx);
  await app.ready();

  // A shared queue holds the queued jobs itself.
  const started = scheduler.start(deps.sharedQueue === undefined ? await store.withStatus("queued") : []);
  if ((options.prewarm ?? []).length > 0) void started.then(() => prewarmAll(options.prewarm ?? [], scheduler, config.modelsDir, logger));

  let closing: Promise<void> | null = null;
  return {
    app,
    service,
    scheduler,
    store,
    async listen() {
      return app.listen({ host: options.host, port: options.port });
    },
    close() {
      closing ??= (async () => {
        await scheduler.close();
        for (const stream of streams) stream.end();
        await app.close();
        await store.close();
      })();
      return closing;
    },
  };
}
