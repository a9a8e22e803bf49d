/** The config resolver: defaults, environment, overrides, a frozen result, and the Python env path set-up uses. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { pythonEnvDir, REPO_ROOT, resolveConfig } from "../src/config/config.ts";

test("defaults derive from HOME: ~/.kino, ~/.cache/kino, the lock-keyed Python env", () => {
  const c = resolveConfig({ HOME: "/home/u" });
  assert.ok(c.home.endsWith("/.kino"));
  assert.equal(c.modelsDir, join(c.home, "models"));
  assert.equal(c.python, join(pythonEnvDir(c.cache, REPO_ROOT), "bin", "python"));
  assert.equal(c.pythonFromEnv, false);
  assert.equal(c.engineDir, join(REPO_ROOT, "engine"));
  assert.ok(Object.isFrozen(c));
});

test("KINO_HOME, KINO_CACHE, XDG_CACHE_HOME and KINO_PYTHON are honoured; overrides win", () => {
  const c = resolveConfig({ KINO_HOME: "/data/kino", XDG_CACHE_HOME: "/xdg", KINO_PYTHON: "/opt/py/bin/python" });
  assert.equal(c.home, "/data/kino");
  assert.equal(c.modelsDir, "/data/kino/models");
  assert.equal(c.cache, "/xdg/kino");
  assert.equal(c.python, "/opt/py/bin/python");
  assert.equal(c.pythonFromEnv, true);
  assert.equal(resolveConfig({ KINO_CACHE: "/c", XDG_CACHE_HOME: "/xdg" }).cache, "/c");
  assert.equal(resolveConfig({ KINO_HOME: "/a" }, { home: "/b" }).home, "/b");
  assert.equal(resolveConfig({ KINO_HOME: "" }, {}).home.endsWith("/.kino"), true, "an empty variable counts as unset");
});

test("the Python env path is the one scripts/lib/env.sh computes", () => {
  const fromShell = execFileSync("bash", ["-c", `. "${REPO_ROOT}/scripts/lib/env.sh"; kino_python_env`], {
    env: { PATH: process.env.PATH, HOME: "/home/u", KINO_CACHE: "/tmp/kino-cache" },
    encoding: "utf8",
  }).trim();
  assert.equal(pythonEnvDir("/tmp/kino-cache", REPO_ROOT), fromShell);
});
