// Direct transfer measured (issue 24): page-to-page throughput over a WebRTC
// data channel beside relay forwarding between the same pages, one run.
//
//   node tests/e2e/direct_bench.mjs
//
// A random Mixtral with large experts (4 layers × 8 experts, top-2, hidden
// 256, expert width 1024: 3 MiB per expert) is the relay's genesis. A holder
// page answers one prompt (its experts come from the relay's store); then
// a fresh page answers the same prompt with ?direct=0 (chunks from the
// holder, forwarded by the relay), and another fresh page with direct
// transfer (chunks from a holder over a data channel). Each prints the
// bytes it fetched, the time its fetches took (#fetch-stats) and the rate.
// Env: BENCH_TOKENS (default 4), BENCH_HIDDEN / BENCH_INTER. Numbers are
// printed; nothing is asserted.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, ask, chromiumPath, readNode, startRelay, trackWire } from './lib.mjs';
import { writeRandomMixtral } from './scale_model.mjs';

const log = (s) => console.error(s);
const TOKENS = Number(process.env.BENCH_TOKENS || 4);
const PROMPT = 'Q: copy bado kuzi fe A:';
const ARGS = [...CHROMIUM_ARGS, '--disable-features=WebRtcHideLocalIpsWithMdns'];

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-direct-bench-'));
const m = writeRandomMixtral(path.join(tmp, 'model'), {
  layers: 4, experts: 8, topK: 2,
  hidden: Number(process.env.BENCH_HIDDEN || 256), inter: Number(process.env.BENCH_INTER || 1024),
});
log(`model: ${m.blocks} chain-B blocks, ${(m.bytes / 1e6).toFixed(1)} MB`);
const relay = await startRelay({ model: m.dir });
const browser = await chromium.launch({ executablePath: chromiumPath(), args: ARGS });

const stat = (page) => page.evaluate(() => {
  const d = document.getElementById('fetch-stats')?.dataset ?? {};
  return { bytes: Number(d.payloadBytes ?? 0), fetchMs: Number(d.fetchMs ?? NaN) };
});

async function run(label, query) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const wire = trackWire(page);
  await page.goto(`${relay.base}/${query}`);
  await page.waitForSelector('#summary[data-phase="done"]', { timeout: 300_000 });
  await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 });
  const n0 = (await readNode(page)).net;
  const s0 = await stat(page);
  const mark = wire.mark();
  const a = await ask(page, PROMPT, TOKENS, { engine: 'cpu', timeout: 600_000 });
  const s1 = await stat(page);
  const n1 = (await readNode(page)).net;
  const w = wire.since(mark);
  const bytes = s1.bytes - s0.bytes;
  const fetchMs = s1.fetchMs - s0.fetchMs;
  const r = {
    label,
    state: a.state,
    experts: a.fetched.length,
    mib: bytes / 2 ** 20,
    fetchMs,
    answerMs: a.trace.at(-1).t - a.sentAt,
    mbps: bytes / 1e6 / (fetchMs / 1000),
    directMib: (Number(n1.bytesDirect) - Number(n0.bytesDirect)) / 2 ** 20,
    wsMib: w.chunkBytes / 2 ** 20,
    ids: a.ids.join(','),
  };
  log(`${label}: ${JSON.stringify(r)}`);
  return { r, context };
}

const out = [];
try {
  const holder = await run('holder (from the relay store)', '');
  out.push(holder.r);
  const fwd = await run('relay forwarding', '?direct=0');
  out.push(fwd.r);
  await fwd.context.close();
  const direct = await run('direct (WebRTC)', '');
  out.push(direct.r);
  await direct.context.close();
  await holder.context.close();
} finally {
  await browser.close();
  await relay.stop();
  fs.rmSync(tmp, { recursive: true, force: true });
}

console.log(`\n== direct transfer: ${m.blocks} chain-B blocks, ${(m.bytes / 1e6).toFixed(1)} MB; prompt ${JSON.stringify(PROMPT)}, ${TOKENS} tokens, fresh page each ==`);
for (const r of out) {
  console.log(`RESULT direct_bench path="${r.label}" experts=${r.experts} fetched_mib=${r.mib.toFixed(1)} fetch_ms=${r.fetchMs.toFixed(0)} mb_per_s=${r.mbps.toFixed(1)} answer_ms=${r.answerMs.toFixed(0)} direct_mib=${r.directMib.toFixed(1)} ws_mib=${r.wsMib.toFixed(1)} state=${r.state}`);
}
const same = new Set(out.map((r) => r.ids)).size === 1;
console.log(`greedy ids equal across the three pages: ${same}`);
