/** How stored jobs and artifacts look to clients: ISO times, links, artifact URLs. */
import type { Artifact, Job } from "../schemas.ts";
import type { StoredArtifact, StoredJob } from "./store.ts";

export const jobUrl = (id: string) => `/api/jobs/${id}`;
/** Where the preview a job took at a denoising step is served. */
export const previewUrl = (id: string, step: number) => `${jobUrl(id)}/previews/${step}`;

export function artifactView(jobId: string, a: StoredArtifact): Artifact {
  return { id: a.id, kind: a.kind, contentType: a.contentType, bytes: a.bytes, url: `${jobUrl(jobId)}/video` };
}

const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());

/** @param queuePosition 1-based place in the queue; null unless queued */
export function jobView(job: StoredJob, queuePosition: number | null): Job {
  const self = jobUrl(job.id);
  const { model } = job.submission;
  return {
    id: job.id,
    status: job.status,
    model: model.name,
    noise: model.tiny || model.randomWeights,
    params: job.submission.params,
    createdAt: iso(job.createdAt)!,
    startedAt: iso(job.startedAt),
    finishedAt: iso(job.finishedAt),
    attempts: job.attempts,
    queuePosition: job.status === "queued" ? queuePosition : null,
    cancelRequested: job.cancelRequested,
    error: job.error,
    result: job.result,
    artifacts: job.artifacts.map((a) => artifactView(job.id, a)),
    previewEvery: job.submission.previewEvery,
    links: { self, events: `${self}/events`, cancel: `${self}/cancel`, video: `${self}/video` },
  };
}
