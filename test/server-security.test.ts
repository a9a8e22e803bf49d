/**
 * Who may use the server: loopback by default; any other address only with an API key (refused to
 * start without one); the key checked on every request; cross-origin state-changing requests and
 * foreign Host headers refused; internal errors answered without their details.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { KinoError } from "../src/errors.ts";
import { isLoopbackHost, parseKeepAlive, resolveServeOptions } from "../src/server/options.ts";
import { runKino } from "./fixtures/cli.ts";
import { SMALL_JOB, startTestServer, type TestServer } from "./fixtures/server.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const KEY = "k".repeat(16) + "-test-key-0123456789";

test("loopback addresses are told apart from the others", () => {
  for (const host of ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]", "app.localhost"]) assert.equal(isLoopbackHost(host), true, host);
  for (const host of ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", "localhost.example.com", "[::]"]) assert.equal(isLoopbackHost(host), false, host);
});

test("serve options: loopback by default; another address needs a key; bad flags name themselves", () => {
  const config = { dataDir: "/tmp/kino-data", apiKey: null };
  const defaults = resolveServeOptions(config);
  assert.deepEqual([defaults.host, defaults.port, defaults.apiKey, defaults.keepAliveMs], ["127.0.0.1", 5466, null, 300_000]);
  assert.throws(() => resolveServeOptions(config, { host: "0.0.0.0" }), (e: KinoError) => e.code === "API_KEY_REQUIRED" && e.field === "apiKey");
  assert.equal(resolveServeOptions(config, { host: "0.0.0.0", apiKey: KEY }).apiKey, KEY);
  assert.equal(resolveServeOptions({ ...config, apiKey: KEY }, { host: "0.0.0.0" }).apiKey, KEY, "$KINO_API_KEY through the config");
  assert.throws(() => resolveServeOptions(config, { apiKey: "short" }), (e: KinoError) => e.field === "apiKey");
  assert.throws(() => resolveServeOptions(config, { port: "http" }), (e: KinoError) => e.field === "port");
  assert.throws(() => resolveServeOptions(config, { queueSize: "0" }), (e: KinoError) => e.field === "queueSize");
  assert.throws(() => resolveServeOptions(config, { keepAlive: "soon" }), (e: KinoError) => e.field === "keepAlive");
  assert.deepEqual([defaults.maxBatch, resolveServeOptions(config, { maxBatch: "1" }).maxBatch], [4, 1], "--max-batch: 4 by default, 1 turns batching off");
  assert.throws(() => resolveServeOptions(config, { maxBatch: "0" }), (e: KinoError) => e.field === "maxBatch");
  assert.deepEqual([defaults.batchWindowMs, resolveServeOptions(config, { batchWindow: "0" }).batchWindowMs], [25, 0], "--batch-window: 25 ms by default, 0 never waits");
  assert.throws(() => resolveServeOptions(config, { batchWindow: "-1" }), (e: KinoError) => e.field === "batchWindow");
  assert.deepEqual([defaults.compile, defaults.prewarm], [false, []]);
  assert.throws(() => resolveServeOptions(config, { prewarm: "tiny:64x48" }), (e: KinoError) => e.field === "prewarm");
});

test("keep-alive durations as Ollama spells them", () => {
  assert.equal(parseKeepAlive("5m", "k"), 300_000);
  assert.equal(parseKeepAlive("30s", "k"), 30_000);
  assert.equal(parseKeepAlive("1h", "k"), 3_600_000);
  assert.equal(parseKeepAlive("250ms", "k"), 250);
  assert.equal(parseKeepAlive("10", "k"), 10_000, "a bare number is seconds");
  assert.equal(parseKeepAlive(0, "k"), 0);
  assert.equal(parseKeepAlive("-1", "k"), -1, "negative: keep loaded");
  assert.equal(parseKeepAlive(-5, "k"), -1);
});

test("buildServer refuses a non-loopback host without an API key", async () => {
  await assert.rejects(startTestServer({ options: { host: "0.0.0.0" } }), (e: KinoError) => e.code === "API_KEY_REQUIRED");
});

test("kino serve --host 0.0.0.0 without a key exits 2 naming the fix, starting nothing", async () => {
  const home = tempDir("kino-serve-cli-");
  try {
    const run = await runKino(["serve", "--host", "0.0.0.0", "--port", "0"], { home });
    assert.equal(run.code, 2);
    assert.match(run.stderr, /needs an API key/);
    assert.match(run.stderr, /KINO_API_KEY/);
    assert.equal(run.starts, 0);
  } finally {
    removeDir(home);
  }
});

describe("with an API key, bound beyond loopback", () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer({ options: { host: "0.0.0.0", apiKey: KEY } });
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test("requests without the key, or with a wrong one, are 401 and do nothing", async () => {
    for (const authorization of [undefined, "Bearer wrong-key-wrong-key-wrong", `Basic ${KEY}`, `Bearer ${KEY}x`]) {
      const res = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: SMALL_JOB, headers: authorization === undefined ? {} : { authorization } });
      assert.equal(res.statusCode, 401, authorization);
      assert.equal(res.json().error.code, "UNAUTHORIZED");
      assert.equal(res.headers["www-authenticate"], 'Bearer realm="kino"');
    }
    for (const url of ["/api/jobs", "/api/health", "/api/ps", "/api/models"]) {
      assert.equal((await t.server.app.inject({ method: "GET", url })).statusCode, 401, url);
    }
    const listed = await t.server.app.inject({ method: "GET", url: "/api/jobs", headers: { authorization: `Bearer ${KEY}` } });
    assert.deepEqual(listed.json().jobs, [], "nothing was submitted");
  });

  test("with the key they are served; the OpenAPI document is public", async () => {
    const res = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: SMALL_JOB, headers: { authorization: `Bearer ${KEY}` } });
    assert.equal(res.statusCode, 202);
    assert.equal((await t.server.app.inject({ method: "GET", url: "/openapi.json" })).statusCode, 200);
    const doc = (await t.server.app.inject({ method: "GET", url: "/openapi.json" })).json();
    assert.deepEqual(doc.security, [{ bearer: [] }]);
  });

  test("any Host is answered (the key is the guard), over a real socket too", async () => {
    const base = await t.server.listen();
    const port = new URL(base).port;
    const res = await fetch(`http://127.0.0.1:${port}/api/health`, { headers: { authorization: `Bearer ${KEY}`, host: "kino.example.com" } });
    assert.equal(res.status, 200);
    assert.equal((await fetch(`http://127.0.0.1:${port}/api/health`)).status, 401);
  });
});

describe("on loopback, without a key", () => {
  let t: TestServer;
  before(async () => {
    t = await startTestServer({
      routes: [
        async (app) => {
          app.get("/api/boom", async () => {
            throw new Error("secret detail /home/user/.kino/kino.db");
          });
        },
      ],
    });
  });
  after(async () => {
    await t.server.close();
    removeDir(t.home);
  });

  test("a POST from a page of another origin is 403 and creates nothing", async () => {
    for (const origin of ["https://evil.example", "http://localhost:9999", "null"]) {
      const res = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: SMALL_JOB, headers: { origin, host: "localhost:5466" } });
      assert.equal(res.statusCode, 403, origin);
      assert.equal(res.json().error.code, "CROSS_ORIGIN");
      assert.equal(res.json().error.field, "Origin");
    }
    const cross = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: SMALL_JOB, headers: { "sec-fetch-site": "cross-site" } });
    assert.equal(cross.statusCode, 403, "Sec-Fetch-Site: cross-site without an Origin");
    assert.deepEqual((await t.server.app.inject({ method: "GET", url: "/api/jobs" })).json().jobs, []);
  });

  test("a POST from the server's own origin is accepted; reads from elsewhere get no CORS grant", async () => {
    const same = await t.server.app.inject({ method: "POST", url: "/api/jobs", payload: SMALL_JOB, headers: { origin: "http://localhost:5466", host: "localhost:5466" } });
    assert.equal(same.statusCode, 202);
    const cancel = await t.server.app.inject({ method: "POST", url: `/api/jobs/${same.json().id}/cancel`, headers: { origin: "https://evil.example" } });
    assert.equal(cancel.statusCode, 403, "cancelling is state-changing too");
    const read = await t.server.app.inject({ method: "GET", url: "/api/jobs", headers: { origin: "https://evil.example" } });
    assert.equal(read.statusCode, 200);
    assert.equal(read.headers["access-control-allow-origin"], undefined, "a browser will not let the other page read it");
  });

  test("a Host that is not a loopback name is refused (DNS rebinding)", async () => {
    const res = await t.server.app.inject({ method: "GET", url: "/api/jobs", headers: { host: "attacker.example:5466" } });
    assert.equal(res.statusCode, 403);
    assert.equal(res.json().error.code, "UNTRUSTED_HOST");
    for (const host of ["localhost:5466", "127.0.0.1:5466", "[::1]:5466"]) {
      assert.equal((await t.server.app.inject({ method: "GET", url: "/api/health", headers: { host } })).statusCode, 200, host);
    }
  });

  test("an unexpected error is a 500 with a generic message: no stack, no detail", async () => {
    const res = await t.server.app.inject({ method: "GET", url: "/api/boom" });
    assert.equal(res.statusCode, 500);
    assert.deepEqual(res.json(), { error: { code: "INTERNAL", message: "internal error; the server's log has the details", field: null } });
  });
});
