/**
 * The web UI in headless Chromium (Debian's chromium, driven by playwright-core), served by kino
 * from the Vite build: on the real engine with the tiny model on the CPU, a job submitted through
 * the form, its live progress, previews and memory chart, the video playing in the gallery, and a
 * screenshot checked; on FakeEngine, a server with an API key (the page asks for it, streams events
 * and fetches previews with it) and cancellation. Also the page's pure parts (formatting, the event
 * fold) and POST /api/plan.
 */
import assert from "node:assert/strict";
import { copyFileSync, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { chromium, type Browser, type Page } from "playwright-core";
import { PNG } from "pngjs";
import { REPO_ROOT, resolveConfig } from "../src/config/config.ts";
import { FakeEngine } from "../src/engine/fake.ts";
import { SubprocessEngine } from "../src/engine/subprocess.ts";
import { makeTinyCheckpoint } from "../src/engine/tools.ts";
import { PlanEstimate } from "../src/server/schemas.ts";
import { uiRoutes } from "../src/server/ui-routes.ts";
import { estimateLine, formatBytes, formatDuration, progressLine } from "../src/ui/format.ts";
import { applyEvent, INITIAL } from "../src/ui/job-state.ts";
import { startTestServer, type TestServer } from "./fixtures/server.ts";
import { removeDir, tempDir } from "./fixtures/temp.ts";

const UI_DIR = join(REPO_ROOT, "dist", "ui");
const CHROMIUM = "/usr/bin/chromium";
const VIEWPORT = { width: 1280, height: 900 };

async function launch(): Promise<Browser> {
  assert.ok(existsSync(CHROMIUM), "Debian's chromium is installed (scripts/setup.sh installs it)");
  assert.ok(existsSync(join(UI_DIR, "index.html")), "the UI is built (npm run build)");
  // Root in a container has no user namespaces for Chromium's sandbox.
  return chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
}

/** A page that records console errors and every request that leaves the server. */
async function openPage(browser: Browser, url: string): Promise<{ page: Page; problems: string[] }> {
  const page = await browser.newPage({ viewport: VIEWPORT });
  const problems: string[] = [];
  page.on("console", (m) => {
    // The browser logs every 4xx answer; those the page shows as messages (a bad field, a missing key) are not problems.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith(url) && !u.startsWith("blob:") && !u.startsWith("data:")) problems.push(`request to another origin: ${u}`);
  });
  await page.goto(url);
  return { page, problems };
}

/** Waits until the element's text matches; a timeout says what the text was. */
async function waitForText(page: Page, selector: string, pattern: RegExp, timeoutMs = 30_000): Promise<string> {
  const started = Date.now();
  let text = "";
  while (Date.now() - started < timeoutMs) {
    text = (await page.textContent(selector).catch(() => null)) ?? "";
    if (pattern.test(text)) return text;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${selector} never matched ${pattern} in ${timeoutMs} ms; its text: "${text}"`);
}

/** A preview image as the page loaded it, with what the card said at that moment. */
interface PreviewLoad {
  readonly width: number;
  readonly height: number;
  readonly label: string;
  readonly status: string;
}

/** Records every preview image the page loads (its natural size, its label, the job's status then). */
async function recordPreviews(page: Page): Promise<() => Promise<PreviewLoad[]>> {
  await page.evaluate(() => {
    const loads: unknown[] = [];
    (window as unknown as { previewLoads: unknown[] }).previewLoads = loads;
    const image = document.getElementById("preview-image") as HTMLImageElement;
    image.addEventListener("load", () =>
      loads.push({
        width: image.naturalWidth,
        height: image.naturalHeight,
        label: document.getElementById("preview-label")?.textContent ?? "",
        status: document.getElementById("job-status")?.textContent ?? "",
      }),
    );
  });
  return () => page.evaluate(() => (window as unknown as { previewLoads: PreviewLoad[] }).previewLoads);
}

/** The preview the card shows now. */
function shownPreview(page: Page) {
  return page.$eval("#preview", (figure) => {
    const image = figure.querySelector("img")!;
    return {
      hidden: (figure as HTMLElement).hidden,
      src: image.src,
      natural: [image.naturalWidth, image.naturalHeight],
      shown: [image.clientWidth, image.clientHeight],
      label: figure.querySelector("figcaption")?.textContent ?? "",
    };
  });
}

/** Waits until the gallery's video of `jobId` has decoded a frame; returns its duration. */
async function videoPlays(page: Page, jobId: string): Promise<number> {
  const selector = `#gallery figure[data-job="${jobId}"] video`;
  await page.waitForSelector(selector, { timeout: 30_000 });
  await page.waitForFunction((s) => (document.querySelector(s) as HTMLVideoElement | null)?.readyState! >= 2, selector, { timeout: 30_000 });
  return page.$eval(selector, (v) => (v as HTMLVideoElement).duration);
}

describe("the page's pure parts", () => {
  test("bytes, durations, the progress line and the estimate line", () => {
    assert.deepEqual([formatBytes(512 * 2 ** 20), formatBytes(9.84 * 2 ** 30)], ["512 MiB", "9.8 GiB"]);
    assert.deepEqual([formatDuration(4.24), formatDuration(42), formatDuration(130), formatDuration(3 * 3600 + 120)], ["4.2 s", "42 s", "2 min 10 s", "3 h 2 min"]);
    const step = { type: "progress", phase: "denoise", step: 3, total: 10, s_per_step: 0.214, eta: 1.5, vram_bytes: null, ram_bytes: 2 ** 30 } as const;
    assert.equal(progressLine(step), "denoising · step 3/10 · 0.214 s/step · ETA 1.5 s");
    assert.equal(progressLine({ ...step, phase: "decode", step: null, total: null, s_per_step: null, eta: null }), "decoding the frames");
    const plan = PlanEstimate.parse({
      model: "wan2.1-t2v-1.3b", width: 832, height: 480, frames: 81, steps: 50, hardware: "h100-80gb", serverGpu: false, note: "n",
      estimate: { peakVramBytes: 12 * 2 ** 30, peakRamBytes: 20 * 2 ** 30, seconds: 130, secondsPerStep: 2.6, transformer: "resident", decode: "full" },
    });
    assert.equal(estimateLine(plan), "peak VRAM 12.0 GiB · RAM 20.0 GiB · about 2 min 10 s (2.6 s/step) · transformer resident, decode full — n");
  });

  test("the event fold: status, latest progress, memory samples per step (reset by a new attempt), error", () => {
    const progress = (step: number | null, vram: number | null, ram: number | null) =>
      ({ type: "progress", phase: "denoise", step, total: 2, s_per_step: 0.1, eta: 0.1, vram_bytes: vram, ram_bytes: ram }) as const;
    let s = applyEvent(INITIAL, { type: "started", attempt: 1, engine: 0 });
    s = applyEvent(s, { type: "model.loading", model: "tiny" });
    assert.equal(s.loading, "tiny");
    s = applyEvent(s, progress(null, null, null));
    assert.equal(s.loading, null, "the first progress ends the load");
    s = applyEvent(s, progress(1, null, 2 ** 30));
    s = applyEvent(s, progress(2, 2 ** 31, 2 ** 30));
    assert.equal(s.status, "running");
    assert.deepEqual(s.memory, { step: [1, 2], vram: [null, 2], ram: [1, 1] });
    assert.deepEqual(applyEvent(s, { type: "started", attempt: 2, engine: 0 }).memory, INITIAL.memory);
    const error = { code: "OOM", message: "m", field: null };
    assert.deepEqual([applyEvent(s, { type: "failed", error }).status, applyEvent(s, { type: "failed", error }).error], ["failed", error]);
  });
});

describe("the web UI on the real engine (tiny model, CPU) in Chromium", { timeout: 300_000 }, () => {
  const home = tempDir("kino-ui-e2e-");
  const base = resolveConfig(process.env);
  const config = resolveConfig({ KINO_HOME: home, HOME: home }, { python: base.python, cache: join(home, "cache"), stallTimeoutMs: 120_000 });
  let t: TestServer;
  let url: string;
  let browser: Browser;

  before(async () => {
    t = await startTestServer({
      home,
      config,
      routes: [uiRoutes({ dir: UI_DIR })],
      engine: () => SubprocessEngine.start(config),
      makeTiny: (dir) => makeTinyCheckpoint(config, dir, 3),
    });
    url = await t.server.listen();
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await t?.server.close();
    removeDir(home);
  });

  test("the page is served with its assets under a strict CSP; other paths stay the API's", async () => {
    const page = await fetch(`${url}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get("content-type") ?? "", /text\/html/);
    assert.match(page.headers.get("content-security-policy") ?? "", /default-src 'self'.*connect-src 'self'/);
    const html = await page.text();
    const asset = /src="(\/assets\/[^"]+\.js)"/.exec(html)?.[1];
    assert.ok(asset !== undefined, html);
    assert.equal((await fetch(`${url}${asset}`)).status, 200);
    assert.doesNotMatch(html, /https?:\/\//, "nothing is loaded from another origin");
    const missing = await fetch(`${url}/assets/nothing.js`);
    assert.equal(missing.status, 404);
    assert.equal((await missing.json()).error.code, "ROUTE_NOT_FOUND");
  });

  test("estimate, submit through the form, live progress, previews and memory chart, the video plays in the gallery; screenshot", async () => {
    const { page, problems } = await openPage(browser, url);
    await waitForText(page, "#health", /engines ok/);

    // The planner's estimate before submitting: this CPU server plans a Wan model on the H100 profile, and says so.
    await page.selectOption("#model", "wan2.1-t2v-1.3b");
    const wan = await waitForText(page, "#estimate", /peak VRAM/);
    assert.match(wan, /peak VRAM \d+\.\d GiB · RAM \d+\.\d GiB · about .* s\/step\) · transformer .* this server has no GPU/);
    await page.fill("#frames", "80");
    await waitForText(page, "#estimate", /frames: must be 4k\+1/);
    await page.fill("#frames", "");

    await page.selectOption("#model", "tiny");
    await page.fill("#prompt", "a lighthouse at dusk, waves crashing");
    await page.fill("#size", "160x96");
    await page.fill("#frames", "9");
    await page.fill("#steps", "8");
    await page.fill("#seed", "7");
    await waitForText(page, "#estimate", /^160x96, 9 frames, 8 steps: no estimate \(tiny is kino's test model/);
    const previewLoads = await recordPreviews(page);
    await page.click("#submit");

    await page.waitForSelector("#current:not([hidden])");
    await waitForText(page, "#job-line", /step \d+\/8 · [\d.]+ s\/step · ETA/, 120_000);
    await waitForText(page, "#job-status", /^completed$/, 120_000);
    assert.match((await page.textContent("#job-line")) ?? "", /^done: 9 frames 160x96 in .* s\/step · peak RAM \d/);
    assert.equal(await page.$eval("#chart", (c) => (c as HTMLElement).dataset.points), "8", "a RAM sample per step (the CPU has no VRAM)");
    assert.equal(await page.$eval("#chart canvas", (c) => (c as HTMLCanvasElement).width > 0), true);

    // Previews (by default one per step of 8): loaded while the job ran, the latents' size (160x96 / 8).
    const loads = await previewLoads();
    const during = loads.filter((l) => l.status === "running");
    assert.ok(during.length > 0 && during.every((l) => l.width === 20 && l.height === 12), `previews loaded while it ran: ${JSON.stringify(loads)}`);
    assert.ok(during.every((l) => /^step [1-8]\/8 preview$/.test(l.label)), JSON.stringify(during));
    // The last one stays after completion, scaled up to the card's width with its aspect ratio.
    await waitForText(page, "#preview-label", /^step 8\/8 preview$/);
    const last = await shownPreview(page);
    assert.equal(last.hidden, false);
    assert.match(last.src, /^blob:/, "fetched through the API client");
    assert.deepEqual(last.natural, [20, 12]);
    assert.ok(last.shown[0]! >= 20 * 10, `scaled up: ${last.shown.join("x")}`);
    assert.ok(Math.abs(last.shown[0]! / last.shown[1]! - 20 / 12) < 0.05, `its aspect ratio kept: ${last.shown.join("x")}`);

    const [job] = (await t.server.service.list({ limit: 1 })).jobs;
    assert.equal(job?.status, "completed");
    const duration = await videoPlays(page, job!.id);
    assert.ok(Math.abs(duration - 9 / 16) < 0.1, `the video lasts 9 frames at 16 fps: ${duration}`);
    const href = await page.getAttribute(`#gallery figure[data-job="${job!.id}"] a.download`, "href");
    assert.equal(href, `/api/jobs/${job!.id}/video`);
    assert.match((await page.textContent(`#gallery figure[data-job="${job!.id}"] .meta`)) ?? "", /tiny · 160x96 · 9 frames · 8 steps · seed 7/);

    // The estimate of a Wan job in the form, for the screenshot to show every part of the page.
    await page.selectOption("#model", "wan2.1-t2v-1.3b");
    await page.fill("#size", "832x480");
    await page.fill("#frames", "81");
    await page.fill("#steps", "50");
    await waitForText(page, "#estimate", /^peak VRAM/);

    const file = join(home, "ui.png");
    // The whole page: the preview makes the job's card taller than the viewport leaves room for with
    // the gallery. The viewport grows to it first, and the gallery's video is let settle after the resize.
    const height = await page.evaluate(() => document.documentElement.scrollHeight);
    await page.setViewportSize({ width: VIEWPORT.width, height });
    await videoPlays(page, job!.id);
    await page.waitForTimeout(500);
    await page.screenshot({ path: file });
    const png = PNG.sync.read(readFileSync(file));
    assert.equal(png.width, VIEWPORT.width);
    assert.ok(png.height > VIEWPORT.height, `the page below the fold too: ${png.height} px`);
    const colors = new Set<number>();
    for (let i = 0; i < png.data.length; i += 4 * 97) colors.add(png.data.readUInt32BE(i));
    assert.ok(colors.size > 50, `a rendered page, not a blank one: ${colors.size} colors sampled`);
    if (process.env.KINO_UI_SCREENSHOT !== undefined) copyFileSync(file, process.env.KINO_UI_SCREENSHOT);
    assert.deepEqual(problems, []);
  });
});

describe("the web UI with an API key, and cancel (FakeEngine) in Chromium", { timeout: 120_000 }, () => {
  const KEY = "ui-test-key-0123456789";
  let t: TestServer;
  let url: string;
  let browser: Browser;

  before(async () => {
    t = await startTestServer({ options: { apiKey: KEY }, routes: [uiRoutes({ dir: UI_DIR })], engine: async () => new FakeEngine({ stepMs: 20 }) });
    url = await t.server.listen();
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await t?.server.close();
    removeDir(t.home);
  });

  test("the page asks for the key, then streams events and fetches previews with it; cancel stops a running job; a finished video plays from a blob", async () => {
    const { page, problems } = await openPage(browser, url);
    await page.waitForSelector("#key-form:not([hidden])");
    assert.equal(await page.textContent("#health"), "this server needs an API key");
    await page.fill("#key", KEY);
    await page.click("#key-form button");
    await waitForText(page, "#health", /engines ok/);

    await page.selectOption("#model", "tiny");
    await page.fill("#prompt", "a long wait");
    await page.fill("#size", "64x48");
    await page.fill("#frames", "5");
    await page.fill("#steps", "5000");
    await page.click("#submit");
    await waitForText(page, "#job-line", /step \d+\/5000/);
    await page.click("#cancel");
    await waitForText(page, "#job-status", /^cancelled$/);
    const [cancelled] = (await t.server.service.list({ limit: 1 })).jobs;
    assert.equal(cancelled?.status, "cancelled");

    await page.fill("#steps", "3");
    await page.click("#submit");
    await waitForText(page, "#job-status", /^completed$/);
    // Its previews, fetched with the key (the route answers 401 without it): the last one stays.
    await waitForText(page, "#preview-label", /^step 3\/3 preview$/);
    const preview = await shownPreview(page);
    assert.deepEqual([preview.hidden, preview.natural], [false, [8, 6]], "64x48: a preview of 8x6");
    assert.match(preview.src, /^blob:/);
    const [done] = (await t.server.service.list({ limit: 1 })).jobs;
    assert.ok((await videoPlays(page, done!.id)) > 0);
    const src = await page.$eval(`#gallery figure[data-job="${done!.id}"] video`, (v) => (v as HTMLVideoElement).src);
    assert.match(src, /^blob:/, "with a key, the video is fetched with the header and played from a blob");
    assert.equal(await page.$eval("#gallery", (g) => (g as HTMLElement).dataset.count), "1", "the cancelled job is not in the gallery");
    assert.deepEqual(problems, []);
  });
});

describe("POST /api/plan", () => {
  test("the tiny model: the shape with defaults, no estimate; Wan: the H100 profile's estimate; bad fields named", async () => {
    const t = await startTestServer();
    try {
      const plan = async (payload: object) => t.server.app.inject({ method: "POST", url: "/api/plan", payload });
      const tiny = PlanEstimate.parse((await plan({ model: "tiny" })).json());
      assert.deepEqual([tiny.width, tiny.height, tiny.frames, tiny.steps, tiny.estimate], [320, 192, 17, 10, null]);
      const wan = PlanEstimate.parse((await plan({ model: "wan2.1-t2v-14b", size: "1280x720" })).json());
      assert.equal(wan.hardware, "h100-80gb");
      assert.equal(wan.serverGpu, false);
      assert.ok(wan.estimate !== null && wan.estimate.peakVramBytes > 2 ** 30 && wan.estimate.seconds > wan.estimate.secondsPerStep);
      const small = PlanEstimate.parse((await plan({ model: "wan2.1-t2v-14b", size: "832x480", frames: 33 })).json());
      assert.ok(small.estimate!.seconds < wan.estimate!.seconds, "a smaller job is predicted faster");
      for (const [payload, field] of [
        [{ model: "tiny", frames: 8 }, "frames"],
        [{ model: "tiny", size: "100x100" }, "size"],
        [{ model: "nope" }, "model"],
        [{ model: "tiny", prompt: "x" }, "prompt"],
      ] as const) {
        const res = await plan(payload);
        assert.ok(res.statusCode >= 400 && res.statusCode < 500, `${field}: ${res.statusCode}`);
        assert.equal(res.json().error.field, field);
      }
    } finally {
      await t.server.close();
      removeDir(t.home);
    }
  });
});
