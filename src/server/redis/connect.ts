/**
 * `--queue redis://host:port[/db]`: the Redis-backed job store and shared queue of a node, on
 * connections checked before the server starts (a Redis that does not answer is refused at once,
 * naming the address, rather than retried for ever).
 */
import { Redis } from "ioredis";
import { KinoError } from "../../errors.ts";
import type { Logger } from "../../log.ts";
import { checkQueueUrl, redactUrl } from "../options.ts";
import { BullMqQueue } from "./bullmq-queue.ts";
import { RedisJobStore } from "./store.ts";

export interface RedisBackend {
  readonly store: RedisJobStore;
  readonly queue: BullMqQueue;
}

export interface RedisBackendOptions {
  readonly logger: Logger;
  /** Key prefix, so several kino clusters can share one Redis. @default "kino" */
  readonly prefix?: string;
  /** See BullMqQueueOptions.lockMs. */
  readonly lockMs?: number;
  /** @default 5000 */
  readonly connectTimeoutMs?: number;
}

/**
 * @throws KinoError INVALID_ARGUMENT (field "queue") for an address that is not redis:// or rediss://;
 *   QUEUE_UNAVAILABLE when Redis does not answer
 */
export async function connectRedis(url: string, options: RedisBackendOptions): Promise<RedisBackend> {
  checkQueueUrl(url);
  const client = new Redis(url, { lazyConnect: true, connectTimeout: options.connectTimeoutMs ?? 5000, maxRetriesPerRequest: 3 });
  // A failed first connection is reported below, once; the client would report it as an event too.
  const quiet = () => {};
  client.on("error", quiet);
  try {
    await client.connect();
    await client.ping();
    client.off("error", quiet);
  } catch (err) {
    client.disconnect();
    throw new KinoError("QUEUE_UNAVAILABLE", `Redis at ${redactUrl(url)} does not answer: ${(err as Error).message}`, { field: "queue", cause: err });
  }
  // ioredis reconnects by itself; what went wrong is worth a line in the log, not a crash.
  const onError = (err: Error) => options.logger.warn(`Redis at ${redactUrl(url)}: ${err.message}`);
  const duplicate = () => client.duplicate().on("error", onError);
  const queue = new BullMqQueue({
    connection: { url },
    subscriber: duplicate(),
    publisher: duplicate(),
    prefix: options.prefix,
    logger: options.logger,
    lockMs: options.lockMs,
  });
  return { store: new RedisJobStore(client, { prefix: options.prefix, onError }), queue };
}
