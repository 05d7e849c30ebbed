// The page's numbers for the scale benchmark (scripts/bench-scale.sh,
// issue 22): a fresh headless-Chromium page on a running relay (which
// serves the page and has the model as its genesis) lists and verifies the
// chain, then answers one prompt with the CPU engine.
//
//   node tests/e2e/scale_page.mjs RELAY_URL
//
// Prints one JSON object on stdout (progress on stderr): the page's own
// timings (listing + meta payloads, header verification, startup payloads:
// #progress's data attributes, page clock), load time until
// #summary[data-phase=done] and online, the first answer's time (click to
// the last token) and first-token time, the payload bytes and requests it
// fetched for that answer (#fetch-stats), its peak memory: wasm memory
// (#memory data-wasm-bytes; wasm memory only grows, so it is the peak), JS
// heap (performance.memory) and the Chromium processes' summed RSS, sampled
// every 250 ms (Linux /proc). Nothing is asserted.
//
// Env: SCALE_PROMPT, SCALE_TOKENS (default 8), SCALE_QUERY (appended to the
// page's address, e.g. "?budget_mb=64"), SCALE_TIMEOUT_S (default 900).
// Bytes: payloadBytes are payload chunks however they came (REST or /ws);
// restBytes every REST body byte (listings, chunk lists, REST payloads).

import fs from 'node:fs';
import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, ask, chromiumPath, readNode } from './lib.mjs';

const log = (s) => console.error(s);
const base = (process.argv[2] || '').replace(/\/+$/, '');
if (!/^https?:\/\//.test(base)) {
  console.error('usage: node tests/e2e/scale_page.mjs RELAY_URL (http://host:port)');
  process.exit(2);
}
const TOKENS = Number(process.env.SCALE_TOKENS || 8);
const PROMPT = process.env.SCALE_PROMPT || 'The chain';
const QUERY = process.env.SCALE_QUERY || '';
const TIMEOUT = Number(process.env.SCALE_TIMEOUT_S || 900) * 1000;

// Summed RSS (bytes) of every process below `root` (Linux /proc), or null.
function treeRss(root) {
  let kids;
  try {
    kids = new Map();
    for (const d of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(d)) continue;
      try {
        const st = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
        const ppid = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]);
        if (!kids.has(ppid)) kids.set(ppid, []);
        kids.get(ppid).push(Number(d));
      } catch { /* gone */ }
    }
  } catch {
    return null;
  }
  let total = 0;
  const todo = [...(kids.get(root) || [])];
  while (todo.length) {
    const pid = todo.pop();
    try {
      const m = fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/);
      if (m) total += Number(m[1]) * 1024;
    } catch { /* gone */ }
    todo.push(...(kids.get(pid) || []));
  }
  return total;
}

let peakRss = 0;
const sampler = setInterval(() => {
  const r = treeRss(process.pid);
  if (r != null) peakRss = Math.max(peakRss, r);
}, 250);

const browser = await chromium.launch({
  executablePath: chromiumPath(),
  args: [...CHROMIUM_ARGS, '--enable-precise-memory-info'],
});
let out;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
  let peakHeap = 0;
  const heapNow = async () => {
    const h = await page.evaluate(() => performance.memory?.usedJSHeapSize ?? 0).catch(() => 0);
    peakHeap = Math.max(peakHeap, h);
  };
  const heapTimer = setInterval(() => { heapNow(); }, 500);
  const tl = Date.now();
  await page.goto(`${base}/${QUERY}`);
  try {
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: TIMEOUT });
  } catch (e) {
    throw new Error(`the page did not finish loading: ${e.message}\n${consoleLines.slice(-20).join('\n')}`);
  }
  const summary = await page.evaluate(() => ({ ...(document.getElementById('summary')?.dataset ?? {}) }));
  if (summary.error) throw new Error(`the page could not fetch the chain: ${summary.error}`);
  // The progress line's timings are set once the load is over.
  await page.waitForSelector('#progress[data-verify-ms]', { timeout: 60_000 }).catch(() => {});
  await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 }).catch(() => {});
  const loadMs = Date.now() - tl;
  const prog = await page.evaluate(() => ({ ...(document.getElementById('progress')?.dataset ?? {}) }));
  const fsBefore = await page.evaluate(() => ({ ...(document.getElementById('fetch-stats')?.dataset ?? {}) }));
  log(`loaded in ${loadMs} ms: ${JSON.stringify({ summary, prog })}`);
  const a = await ask(page, PROMPT, TOKENS, { engine: 'cpu', timeout: TIMEOUT });
  const answerMs = a.trace.length && a.sentAt != null ? a.trace.at(-1).t - a.sentAt : null;
  const fsAfter = await page.evaluate(() => ({ ...(document.getElementById('fetch-stats')?.dataset ?? {}) }));
  await heapNow();
  clearInterval(heapTimer);
  const mem = await page.evaluate(() => ({ ...(document.getElementById('memory')?.dataset ?? {}) }));
  const node = await readNode(page);
  const n = (d, k) => (d[k] === undefined ? null : Number(d[k]));
  const diff = (k) => (n(fsAfter, k) == null ? null : n(fsAfter, k) - (n(fsBefore, k) ?? 0));
  out = {
    blocks: n(prog, 'blocks') ?? n(summary, 'total'),
    verified: n(summary, 'verified'),
    failed: n(summary, 'failed'),
    listMs: n(prog, 'listMs'),
    verifyMs: n(prog, 'verifyMs'),
    startupMs: n(prog, 'startupMs'),
    loadMs,
    loadPayloadBytes: n(fsBefore, 'payloadBytes'),
    loadRestBytes: n(fsBefore, 'bytes'),
    answerState: a.state,
    answerTokens: a.tokens,
    answerMs,
    firstTokenMs: a.firstTokenMs,
    answerPayloadBytes: diff('payloadBytes'),
    answerRequests: diff('requests'),
    answerMBps: answerMs ? diff('payloadBytes') / 1e6 / (answerMs / 1000) : null,
    totalRestBytes: n(fsAfter, 'bytes'),
    totalPayloadBytes: n(fsAfter, 'payloadBytes'),
    wsBytesFromRelay: n(node.net ?? {}, 'bytesFromRelay'),
    wsBytesFromPeers: n(node.net ?? {}, 'bytesFromPeers'),
    wasmBytes: n(mem, 'wasmBytes'),
    budget: n(mem, 'budget'),
    jsHeapPeak: peakHeap || null,
    chromiumPeakRss: peakRss || null,
    net: node.net?.state ?? null,
    chatStats: await page.textContent('#chat-stats').catch(() => ''),
  };
  await context.close();
} finally {
  clearInterval(sampler);
  await browser.close();
}
console.log(JSON.stringify(out));
