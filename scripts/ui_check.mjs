// A real browser (Debian's Chromium, driven by playwright-core) against the stack's Prefect UI.
//
//   node scripts/ui_check.mjs <UI URL> [--screenshots DIR] [--page NAME=PATH ...]
//
// Loads each page (default: the dashboard and the monitor's artifact), fails if the UI shows a
// connection error or a page does not show what it should, optionally saves a screenshot of each.
// Prints one JSON line per page; exits 1 on any failure.
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const args = process.argv.slice(2);
const ui = (args.shift() || "").replace(/\/$/, "");
if (!ui) {
  console.error("usage: node scripts/ui_check.mjs <UI URL> [--screenshots DIR] [--page NAME=PATH[|TEXT]]");
  process.exit(2);
}
let shots = null;
const pages = [];
while (args.length) {
  const a = args.shift();
  if (a === "--screenshots") shots = args.shift();
  else if (a === "--page") {
    const [name, rest] = args.shift().split(/=(.*)/s);
    const [p, expect] = rest.split("|");
    pages.push({ name, path: p, expect: expect || null });
  }
}
if (!pages.length) {
  pages.push({ name: "dashboard", path: "/dashboard", expect: null });
  pages.push({ name: "monitor-artifact", path: "/artifacts/key/payment-queue-summary", expect: "Payment queue" });
}
const CONNECTION_ERRORS = [/can't connect to server api/i, /unable to connect to prefect server/i,
  /failed to fetch/i, /network error/i];
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
let failed = 0;
try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 1000 }, colorScheme: "dark" });
  for (const p of pages) {
    const page = await context.newPage();
    const apiCalls = { ok: 0, failed: 0 };
    page.on("response", (r) => { if (r.url().includes("/api/")) r.ok() ? apiCalls.ok++ : apiCalls.failed++; });
    page.on("requestfailed", (r) => { if (r.url().includes("/api/")) apiCalls.failed++; });
    const started = Date.now();
    let problem = null;
    try {
      await page.goto(ui + p.path, { waitUntil: "networkidle", timeout: 45000 });
      if (p.expect) await page.getByText(p.expect, { exact: false }).first().waitFor({ timeout: 20000 });
      await page.waitForTimeout(1500);
      const body = await page.locator("body").innerText();
      const error = CONNECTION_ERRORS.find((re) => re.test(body));
      if (error) problem = `the page says ${error}`;
      else if (apiCalls.ok === 0) problem = "the page made no successful API call";
    } catch (e) {
      problem = String(e.message || e).split("\n")[0];
    }
    if (shots) {
      fs.mkdirSync(shots, { recursive: true });
      await page.screenshot({ path: path.join(shots, `${p.name}.png`), fullPage: false });
    }
    if (problem) failed++;
    console.log(JSON.stringify({ page: p.name, url: ui + p.path, ok: !problem, problem, seconds: (Date.now() - started) / 1000, api_ok: apiCalls.ok, api_failed: apiCalls.failed }));
    await page.close();
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
