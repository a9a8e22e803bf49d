/** What every route module gets: the services it calls and where it declares its routes. */
import type { Logger } from "../../log.ts";
import type { RouteTable } from "../http/route.ts";
import type { SseStream } from "../http/sse.ts";
import type { JobService } from "../jobs/service.ts";
import type { Scheduler } from "../scheduler/scheduler.ts";

export interface RouteContext {
  readonly service: JobService;
  readonly scheduler: Scheduler;
  /** Declare routes through it (`table.add(app, …)`), so they are validated and documented. */
  readonly table: RouteTable;
  /** Open event streams; the server ends them when it shuts down. */
  readonly streams: Set<SseStream>;
  readonly logger: Logger;
}
