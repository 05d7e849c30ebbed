// The page at scale, measured (issue 22): a random 16 × 64 top-8 Mixtral
// (hidden 64, expert width 96: 1,041 chain-B blocks, about 74 MB) as a
// relay's genesis; a fresh page lists and verifies it, then answers one
// prompt. Prints the first-answer time, the bytes and requests it fetched
// and its fetch throughput, beside the relay's native chunk forwarding
// (relay/examples/peer_bench, release) measured in the same run.
//
//   AIBLOCK_DIST=dist node tests/e2e/scale_bench.mjs
//
// Env: SCALE_DISTS ('label=dir,label=dir?query': pages compared on the
// same model, each opened with its query, default "page=$AIBLOCK_DIST"), SCALE_RELAYS (the matching relay
// binaries, default lib.mjs's), AIBLOCK_PEER_BENCH_BIN (peer_bench; skipped
// when unset), SCALE_TOKENS (default 8), SCALE_HIDDEN/SCALE_INTER.
// Numbers are printed; nothing is asserted.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, REPO, ask, chromiumPath, readNode, startRelay, trackWire } from './lib.mjs';
import { writeRandomMixtral } from './scale_model.mjs';

const log = (s) => console.error(s);
const TOKENS = Number(process.env.SCALE_TOKENS || 8);
const PROMPT = process.env.SCALE_PROMPT || 'Q: copy bado kuzi fe A:';

const dists = (process.env.SCALE_DISTS || `page=${process.env.AIBLOCK_DIST || path.join(REPO, 'dist')}`)
  .split(',').map((kv) => {
    // label=dir or label=dir?query (the page opened with that query)
    const [label, rest] = kv.split(/=(.*)/s);
    const [dir, q] = rest.split('?');
    return [label, dir, q ? `?${q}` : ''];
  });
const relays = (process.env.SCALE_RELAYS || '').split(',').filter(Boolean);

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-scale-bench-'));
const t0 = Date.now();
const m = writeRandomMixtral(path.join(tmp, 'model'), {
  layers: 16, experts: 64, topK: 8,
  hidden: Number(process.env.SCALE_HIDDEN || 64), inter: Number(process.env.SCALE_INTER || 96),
});
log(`model: ${m.blocks} chain-B blocks, ${(m.bytes / 1e6).toFixed(1)} MB, written in ${Date.now() - t0} ms`);

// The relay's native forwarding rate, same machine, same run.
let forwarding = null;
const pb = process.env.AIBLOCK_PEER_BENCH_BIN;
if (pb && fs.existsSync(pb)) {
  const r = spawnSync(pb, ['10', '20'], { encoding: 'utf8', timeout: 300_000 });
  const out = `${r.stdout}\n${r.stderr}`;
  const line = out.split('\n').find((l) => l.startsWith('node -> relay'));
  log(`peer_bench:\n${out.split('\n').filter((l) => /MB\/s|->|echo|forwarded/.test(l)).join('\n')}`);
  forwarding = line ? Number(line.slice(44).trim().split(/\s+/)[0]) : null;
}

const browser = await chromium.launch({ executablePath: chromiumPath(), args: CHROMIUM_ARGS });
const results = [];
try {
  for (let i = 0; i < dists.length; i++) {
    const [label, dist, query = ''] = dists[i];
    if (relays[i]) process.env.AIBLOCK_RELAY_BIN = relays[i];
    const tr = Date.now();
    const relay = await startRelay({ dist, model: m.dir });
    const genesisMs = Date.now() - tr;
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const wire = trackWire(page);
    // Main-thread tasks over 50 ms (Long Tasks API): how long the page
    // stops answering input, e.g. while it verifies 1,000+ headers.
    await page.addInitScript(() => {
      window.__longTasks = [];
      new PerformanceObserver((l) => {
        for (const e of l.getEntries()) window.__longTasks.push({ start: e.startTime, ms: e.duration });
      }).observe({ type: 'longtask', buffered: true });
    });
    const tl = Date.now();
    await page.goto(`${relay.base}/${query}`);
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: 600_000 });
    await page.waitForSelector('#net[data-state="online"]', { timeout: 30_000 }).catch(() => {});
    const loadMs = Date.now() - tl;
    const progress = await page.evaluate(() => document.getElementById('progress')?.textContent ?? '');
    const loadTasks = await page.evaluate(() => window.__longTasks.splice(0));
    const longestLoadTaskMs = Math.max(0, ...loadTasks.map((t) => t.ms));
    const mark = wire.mark();
    const before = await page.evaluate(() => Number(document.getElementById('fetch-stats')?.dataset.payloadBytes ?? 0));
    const reqBefore = await page.evaluate(() => Number(document.getElementById('fetch-stats')?.dataset.requests ?? 0));
    const a = await ask(page, PROMPT, TOKENS, { engine: 'cpu', timeout: 600_000 });
    const answerMs = a.trace.at(-1).t - a.sentAt;
    const after = await page.evaluate(() => Number(document.getElementById('fetch-stats')?.dataset.payloadBytes ?? 0));
    const reqAfter = await page.evaluate(() => Number(document.getElementById('fetch-stats')?.dataset.requests ?? 0));
    const waits = await page.evaluate(() => ({ fetchMs: Number(document.getElementById('fetch-stats')?.dataset.fetchMs ?? NaN), storeMs: Number(document.getElementById('fetch-stats')?.dataset.storeMs ?? NaN) }));
    const w = wire.since(mark);
    const node = await readNode(page);
    const mem = await page.evaluate(() => ({ ...(document.getElementById('memory')?.dataset ?? {}) }));
    const r = {
      label, genesisMs, loadMs, answerMs, state: a.state, tokens: a.tokens,
      fetched: after - before, requests: reqAfter - reqBefore,
      wsChunkBytes: w.chunkBytes, restRequests: w.rest.length,
      mbps: (after - before) / 1e6 / (answerMs / 1000),
      experts: a.fetched.length, progress, ...waits, mem,
      longestLoadTaskMs, loadLongTasks: loadTasks.length, chatStats: node.reply ? (await page.textContent('#chat-stats')) : '',
    };
    results.push(r);
    log(`${label}: ${JSON.stringify(r, null, 1)}`);
    await context.close();
    await relay.stop();
  }
} finally {
  await browser.close();
}

console.log('\n== page at scale: 16 × 64 top-8 random Mixtral, one fresh page, one answer ==');
console.log(`model: ${m.blocks} chain-B blocks, ${(m.bytes / 1e6).toFixed(1)} MB; prompt ${JSON.stringify(PROMPT)}, ${TOKENS} tokens, CPU engine`);
if (forwarding != null) console.log(`relay native forwarding (peer_bench, node → relay → node): ${forwarding} MB/s`);
for (const r of results) {
  console.log(`${r.label.padEnd(10)} load+verify ${(r.loadMs / 1000).toFixed(1)} s; first answer ${(r.answerMs / 1000).toFixed(1)} s (${r.state}, ${r.tokens} tokens); ` +
    `fetched ${(r.fetched / 2 ** 20).toFixed(1)} MiB for ${r.experts} experts in ${r.requests} requests: ${r.mbps.toFixed(1)} MB/s over the answer` +
    (forwarding ? ` (${(100 * r.mbps / forwarding).toFixed(0)}% of forwarding)` : '') +
    `; longest main-thread task while loading ${r.longestLoadTaskMs.toFixed(0)} ms (${r.loadLongTasks} over 50 ms)`);
}
fs.rmSync(tmp, { recursive: true, force: true });
