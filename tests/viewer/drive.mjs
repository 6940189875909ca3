// Drives one headless Chromium page for the Python tests, one JSON command per line on
// stdin, one JSON answer per line on stdout:
//   {"op": "goto", "url": ...}                      -> {"ok": true}
//   {"op": "eval", "js": "() => ..."}               -> {"ok": true, "value": ...}
//   {"op": "wait", "js": "() => ...", "timeout_ms"} -> {"ok": true, "value": ...} once truthy
//   {"op": "dblclick" | "click", "selector": ...}   -> {"ok": true}
//   {"op": "screenshot", "path": ...}               -> {"ok": true}
//   {"op": "console"}                               -> {"ok": true, "value": [lines so far]}
// Any failure answers {"ok": false, "error": ...}; end of input closes the browser.
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // The container has no GPU; SwiftShader gives OHIF the WebGL it needs.
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const consoleLines = [];
page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));

const answer = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  try {
    let value = null;
    if (cmd.op === 'goto') {
      await page.goto(cmd.url, { waitUntil: 'load', timeout: cmd.timeout_ms ?? 60000 });
    } else if (cmd.op === 'eval') {
      value = await page.evaluate(`(${cmd.js})()`);
    } else if (cmd.op === 'wait') {
      const handle = await page.waitForFunction(`(${cmd.js})()`, null, {
        timeout: cmd.timeout_ms ?? 60000,
        polling: 250,
      });
      value = await handle.jsonValue();
    } else if (cmd.op === 'dblclick') {
      await page.locator(cmd.selector).first().dblclick({ timeout: cmd.timeout_ms ?? 30000 });
    } else if (cmd.op === 'click') {
      await page.locator(cmd.selector).first().click({ timeout: cmd.timeout_ms ?? 30000 });
    } else if (cmd.op === 'screenshot') {
      await page.screenshot({ path: cmd.path });
    } else if (cmd.op === 'console') {
      value = consoleLines.slice();
    } else {
      throw new Error(`unknown op ${cmd.op}`);
    }
    answer({ ok: true, value });
  } catch (e) {
    answer({ ok: false, error: String(e && e.message ? e.message : e).split('\n')[0] });
  }
}
await browser.close();
