// The README's main command, exactly as a new user runs it: `./scripts/run.sh`
// in the checkout, with only AIBLOCK_ADDR set (a free port) and the default
// relative `./data`. Headless Chromium opens the page, sees the chain verified
// and gets one answer; Ctrl-C (SIGINT to the process group) stops it and it
// exits 0; the same command again finds the same chain (no second genesis)
// and the page verifies the same heads. `./data` is removed at the end (an
// existing ./data is moved aside first and put back).
//
//   node tests/e2e/first_run.mjs
//
// A failure prints the last lines run.sh and the relay wrote.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_ARGS, REPO, ask, chromiumPath, freePort, get, listChain, openPage, outDir, sleep,
} from './lib.mjs';

const DATA = path.join(REPO, 'data');
// run.sh builds the relay in release mode the first time (minutes on 2 cores).
const START_TIMEOUT_MS = Number(process.env.AIBLOCK_FIRST_RUN_TIMEOUT_S || 2400) * 1000;

function tail(text, n = 40) {
  return text.split('\n').slice(-n).join('\n');
}

/** `./scripts/run.sh` in its own process group; resolves once the page is served. */
async function runSh(port) {
  const env = { ...process.env, AIBLOCK_ADDR: `127.0.0.1:${port}` };
  delete env.AIBLOCK_DATA;
  let out = '';
  const child = spawn('./scripts/run.sh', [], { cwd: REPO, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  let exited = null;
  const exit = new Promise((resolve) => child.on('exit', (code, signal) => { exited = { code, signal }; resolve(exited); }));
  const base = `http://127.0.0.1:${port}`;
  const t0 = Date.now();
  for (;;) {
    if (exited) throw new Error(`run.sh exited ${JSON.stringify(exited)} before serving; last lines:\n${tail(out)}`);
    try {
      const r = await get(`${base}/readyz`);
      if (r.status === 200) {
        const page = await get(`${base}/`);
        if (page.status === 200) break;
      }
    } catch { /* not listening yet */ }
    if (Date.now() - t0 > START_TIMEOUT_MS) {
      process.kill(-child.pid, 'SIGKILL');
      throw new Error(`run.sh did not serve within ${START_TIMEOUT_MS / 1000} s; last lines:\n${tail(out)}`);
    }
    await sleep(250);
  }
  console.log(`  run.sh served ${base} after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  return {
    base,
    log: () => out,
    /** Ctrl-C: SIGINT to the whole foreground group, as a terminal sends it. */
    async interrupt() {
      process.kill(-child.pid, 'SIGINT');
      const t = setTimeout(() => { try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ } }, 60_000);
      const r = await exit;
      clearTimeout(t);
      return r;
    },
    kill() { if (!exited) try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ } },
  };
}

async function heads(base) {
  const a = await listChain(base, 'A');
  const b = await listChain(base, 'B');
  return { all: [...a, ...b].map((x) => x.hash), heads: [...a, ...b].filter((x) => x.is_head).map((x) => x.hash).sort() };
}

/** Open the page; it must verify every block; returns the verified hashes. */
async function pageVerifies(browser, base, shotName, { answer = false } = {}) {
  const { page, context, report, consoleLines } = await openPage(browser, `${base}/`);
  try {
    assert.equal(report.failed, 0, `failed blocks: ${report.text}`);
    assert.ok(report.total > 0 && report.verified === report.total, `summary: ${report.text}`);
    let reply = null;
    if (answer) {
      reply = await ask(page, 'Q: 2+3=? A:', 8, { timeout: 300_000 });
      assert.equal(reply.state, 'done', `reply: ${JSON.stringify(reply)}\nconsole:\n${consoleLines.slice(-20).join('\n')}`);
      assert.ok(reply.text.trim().length > 0, `empty answer: ${JSON.stringify(reply)}`);
      console.log(`  the page answered ${JSON.stringify(reply.text)}`);
    }
    const shot = path.join(outDir(), shotName);
    await page.screenshot({ path: shot, fullPage: false });
    console.log(`  screenshot: ${shot}`);
    return { verified: report.rows.filter((r) => r.status === 'verified').map((r) => r.hash).sort(), reply };
  } finally {
    await context.close();
  }
}

let moved = null;
if (fs.existsSync(DATA)) {
  moved = `${DATA}.before-first-run-test-${process.pid}`;
  fs.renameSync(DATA, moved);
  console.log(`  (an existing ./data is kept aside as ${moved} and put back afterwards)`);
}
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
let run = null;
let ok = false;
try {
  const port = await freePort();
  run = await runSh(port);
  const first = await heads(run.base);
  const seen = await pageVerifies(browser, run.base, 'first-run.png', { answer: true });
  assert.deepEqual(seen.verified, [...first.all].sort(), 'the page verified every listed block');
  const st = await run.interrupt();
  assert.deepEqual(st, { code: 0, signal: null }, `exit after Ctrl-C; last lines:\n${tail(run.log())}`);
  assert.ok(fs.existsSync(path.join(DATA, 'index.redb')), './data holds the store');
  assert.deepEqual(fs.readdirSync(path.join(DATA, 'tmp')), [], 'nothing left staged in ./data/tmp');
  console.log('PASS ./scripts/run.sh on the default ./data: page verified, answered, Ctrl-C exits 0');

  run = await runSh(await freePort());
  const again = await heads(run.base);
  assert.deepEqual(again.all, first.all, 'the same chain after a restart: no second genesis');
  assert.ok(!/genesis created/.test(run.log()), `a second genesis was written:\n${tail(run.log())}`);
  const seen2 = await pageVerifies(browser, run.base, 'first-run-restart.png');
  assert.deepEqual(seen2.verified, seen.verified, 'the page verifies the same blocks');
  const st2 = await run.interrupt();
  assert.deepEqual(st2, { code: 0, signal: null }, `exit after Ctrl-C; last lines:\n${tail(run.log())}`);
  console.log('PASS restart on the same ./data: same heads, no second genesis');
  ok = true;
} catch (e) {
  console.log(`FAIL first run\n${e.stack || e}`);
  if (run) console.log(`--- last lines of run.sh and the relay ---\n${tail(run.log(), 60)}`);
} finally {
  run?.kill();
  await browser.close();
  fs.rmSync(DATA, { recursive: true, force: true });
  if (moved) fs.renameSync(moved, DATA);
}
console.log(ok ? '2 passed, 0 failed' : '0 passed, 1 failed');
process.exit(ok ? 0 : 1);
