/**
 * What happens to jobs the server was running when it stopped.
 *
 * - Graceful shutdown (SIGINT, SIGTERM, `close()`): running jobs are stopped between steps and put
 *   back in the queue at once (run-job.ts); they run again when the server is back. Not counted as
 *   an interruption: nothing went wrong.
 * - The process died (crash, SIGKILL, power loss): at the next start, jobs still stored as running
 *   are requeued once (with a notice event saying why); a job found running a second time (it was
 *   running again when the server died again, perhaps because of it) fails with INTERRUPTED.
 *
 * Queued jobs are untouched: they stay queued, in order.
 */
import type { ErrorInfo } from "../schemas.ts";
import type { JobJournal } from "./journal.ts";
import type { StoredJob } from "./store.ts";

/** Unclean stops a job survives by being requeued; one more fails it. */
export const MAX_INTERRUPTIONS = 1;

export function recoveryAction(job: Pick<StoredJob, "interruptions">): "requeue" | "fail" {
  return job.interruptions < MAX_INTERRUPTIONS ? "requeue" : "fail";
}

/** Applies the policy to every job stored as running; call before the scheduler starts. */
export async function recoverInterrupted(journal: JobJournal): Promise<{ requeued: string[]; failed: string[] }> {
  const requeued: string[] = [];
  const failed: string[] = [];
  for (const job of await journal.store.withStatus("running")) {
    (recoveryAction(job) === "requeue" ? requeued : failed).push(job.id);
    await applyRecovery(journal, job);
  }
  return { requeued, failed };
}

/**
 * Recovers one job found running whose server is gone (at a restart, or taken from a shared queue
 * after its node died): requeued (a notice says why) or failed with INTERRUPTED.
 */
export async function applyRecovery(journal: JobJournal, job: StoredJob): Promise<StoredJob> {
  const interruptions = job.interruptions + 1;
  if (recoveryAction(job) === "requeue") {
    return journal.update(
      job.id,
      { status: "queued", startedAt: null, interruptions },
      { type: "notice", message: "requeued: the server stopped while this job ran (it is retried once after an unclean stop)" },
    );
  }
  const error: ErrorInfo = {
    code: "INTERRUPTED",
    message: `the server stopped while this job ran, ${interruptions} times; it is not retried again (it may be what stops the server)`,
    field: null,
  };
  return journal.update(job.id, { status: "failed", finishedAt: journal.now(), error, interruptions }, { type: "failed", error });
}
