/**
 * The sqlite job store: the JobStore conformance suite, durability across reopening, the single-owner
 * lock, and rows written before a field of the submission existed.
 */
import assert from "node:assert/strict";
import { statSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { test } from "node:test";
import type { KinoError } from "../src/errors.ts";
import { databasePath, SqliteJobStore } from "../src/server/jobs/sqlite-store.ts";
import { jobStoreConformance, storeId, SUBMISSION } from "./fixtures/job-store-conformance.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

jobStoreConformance("SqliteJobStore in memory", async () => new SqliteJobStore(":memory:"));

const root = tempDir("kino-store-");
let n = 0;
jobStoreConformance("SqliteJobStore on disk", async () => SqliteJobStore.open(join(root, `data-${n++}`)));
test.after(() => removeDir(root));

test("what a closed store wrote is there when it is opened again", async () => {
  const dir = join(root, "reopen");
  const first = SqliteJobStore.open(dir);
  await first.create(storeId(1), SUBMISSION, 1, { type: "queued", position: 1 });
  await first.update(storeId(1), { status: "running", attempts: 1 }, 2, { type: "started", attempt: 1, engine: 0 });
  await first.close();
  const second = SqliteJobStore.open(dir);
  try {
    assert.equal((await second.get(storeId(1)))?.status, "running");
    assert.deepEqual((await second.events(storeId(1), 0)).map((e) => e.data.type), ["queued", "started"]);
  } finally {
    await second.close();
  }
  assert.equal(statSync(dir).mode & 0o777, 0o700, "the data folder is the server's alone");
});

test("one store per data folder: a second one is refused while the first is open, and allowed after", async () => {
  const dir = join(root, "locked");
  const first = SqliteJobStore.open(dir);
  assert.throws(() => SqliteJobStore.open(dir), (e: KinoError) => e.code === "DATA_DIR_IN_USE" && e.message.includes(databasePath(dir)));
  await first.close();
  const second = SqliteJobStore.open(dir);
  await second.close();
});

test("a job stored before previews existed (no previewEvery in its submission) reads back with none", async () => {
  const dir = join(root, "old-rows");
  const first = SqliteJobStore.open(dir);
  await first.create(storeId(1), { ...SUBMISSION, previewEvery: 4 }, 1, { type: "queued", position: 1 });
  await first.close();
  const db = new DatabaseSync(databasePath(dir));
  const row = db.prepare("SELECT submission FROM jobs WHERE id = ?").get(storeId(1)) as { submission: string };
  const { previewEvery, ...old } = JSON.parse(row.submission) as Record<string, unknown>;
  assert.equal(previewEvery, 4, "the field is stored");
  db.prepare("UPDATE jobs SET submission = ? WHERE id = ?").run(JSON.stringify(old), storeId(1));
  db.close();
  const second = SqliteJobStore.open(dir);
  try {
    assert.equal((await second.get(storeId(1)))?.submission.previewEvery, 0);
  } finally {
    await second.close();
  }
});
