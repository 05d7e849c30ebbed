// The page at scale (issue 22), in headless Chromium: a random Mixtral of
// 16 layers × 64 experts, top-8 (1,041 chain-B blocks; small widths, so it
// stays fast) as the relay's genesis.
// 1. The page lists and verifies all 1,042 blocks and answers as the
//    relay's /chat does; screenshots of the page at that size.
// 2. With a memory budget smaller than the model (?budget_mb=), it answers
//    two prompts routed to different experts, both as /chat does, while its
//    wasm memory and its IndexedDB cache stay within the budget plus a
//    stated margin.
// 3. With a fake small storage quota (IndexedDB refuses writes beyond it,
//    as a full quota does), cached experts are evicted, the meta, shared
//    and router blocks stay, and the page still answers.
// Screenshots go to $AIBLOCK_E2E_OUT (default target/e2e).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, ask, chromiumPath, listChain, outDir, readNode, startRelay } from './lib.mjs';
import { writeRandomMixtral } from './scale_model.mjs';

const MIB = 1 << 20;
const TOKENS = 6;
const PROMPTS = ['Q: copy bado kuzi fe A:', 'Q: 38+45=? A:'];
// The budget of test 2, and what may come on top of it: wasm memory grows
// by the decoded experts and payloads it holds (bounded by the budget) plus
// transient buffers (responses, safetensors decoding) and allocator slack.
const BUDGET_MB = 8;
const WASM_MARGIN = 16 * MIB;
// Fake quota of test 3: room for the core blocks and a few dozen experts.
const QUOTA = 3 * MIB;

const results = [];
async function test(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name}\n${e.stack}`);
  }
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-scale-'));
const model = writeRandomMixtral(path.join(tmp, 'model'), { layers: 16, experts: 64, topK: 8, hidden: 16, inter: 256 });
console.log(`  model: ${model.blocks} chain-B blocks, ${(model.bytes / MIB).toFixed(1)} MiB, ${(model.expertBytes / 1024).toFixed(0)} KiB per expert`);
const relay = await startRelay({ model: model.dir });
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });

/** The relay's greedy answer (native CPU engine) to `prompt`. */
async function relayChat(prompt) {
  const r = await fetch(`${relay.base}/chat`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt, max_tokens: TOKENS }),
  });
  const body = await r.text();
  assert.equal(r.status, 200, `/chat: ${body}`);
  return JSON.parse(body);
}

/** The memory panel's numbers. */
const memory = (page) => page.evaluate(() => {
  const d = document.getElementById('memory')?.dataset ?? {};
  return Object.fromEntries(Object.entries(d).map(([k, v]) => [k, Number(v)]));
});

async function openAt(url, init = null) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  if (init) await context.addInitScript(init.fn, init.arg);
  const page = await context.newPage();
  const lines = [];
  page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
  await page.goto(url);
  try {
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: 240_000 });
  } catch (e) {
    throw new Error(`${e.message}\n${lines.join('\n')}`);
  }
  await page.waitForSelector('#net[data-state="online"]', { timeout: 30_000 }).catch(() => {});
  return { context, page, lines };
}

let expected = [];
try {
  const a = await listChain(relay.base, 'A');
  const b = await listChain(relay.base, 'B');
  assert.equal(b.length, 1041, 'chain B: shared + 16 × (router + 64 experts)');
  const core = new Set(b.filter((x) => !/\.expert\d+$/.test(x.name)).map((x) => x.hash).concat(a.map((x) => x.hash)));
  expected = [await relayChat(PROMPTS[0]), await relayChat(PROMPTS[1])];
  console.log(`  relay /chat: ${expected.map((e) => `[${e.tokens}]`).join(' and ')}`);

  await test('1,042 blocks: listed and verified in the page, which answers as /chat does', async () => {
    const { context, page } = await openAt(`${relay.base}/`);
    try {
      const s = (await readNode(page)).summary;
      assert.equal(Number(s.total), 1 + 1041);
      assert.equal(Number(s.verified), 1042, s.text);
      assert.equal(Number(s.failed), 0);
      const rows = await page.$$eval('tr[data-hash]', (r) => r.length);
      assert.equal(rows, 1042, 'one table row per block');
      // Collapsed per layer: the page is not a 1,042-row wall.
      const open = await page.$$eval('details.layer-rows[open]', (d) => d.length);
      assert.equal(open, 0, 'layer sections start collapsed at this size');
      await page.screenshot({ path: path.join(outDir(), 'scale-loaded.png'), fullPage: true });
      const r = await ask(page, PROMPTS[0], TOKENS, { engine: 'cpu' });
      assert.equal(r.state, 'done', JSON.stringify(r));
      assert.deepEqual(r.ids, expected[0].tokens, 'page ids != relay /chat ids');
      const fetched = await page.$eval('#fetch-stats', (e) => e.dataset.experts.split(',').filter(Boolean).length);
      // Held experts shown per layer, not as a list of hundreds of names.
      const perLayer = await page.$$eval('#fetch-stats .layer-held', (x) => x.map((e) => Number(e.dataset.count)));
      assert.equal(perLayer.reduce((n, c) => n + c, 0), fetched);
      const text = await page.$eval('#fetch-stats', (e) => e.textContent);
      assert.ok(text.length < 600, `fetch line is ${text.length} chars`);
      // The DAG picture: one square per slot, every chain-B slot present.
      const squares = await page.$$eval('#dag svg g.sq[data-chain="B"]', (g) => g.length);
      assert.equal(squares, 1041);
      const svgWidth = await page.$eval('#dag svg', (s) => Number(s.getAttribute('width')));
      assert.ok(svgWidth < 1280, `DAG picture ${svgWidth} px wide`);
      await page.click('details.layer-rows[data-section="layer 3"] > summary');
      await page.screenshot({ path: path.join(outDir(), 'scale-answered.png'), fullPage: true });
      console.log(`  ${fetched} experts fetched for one answer; ${JSON.stringify(await memory(page))}`);
    } finally {
      await context.close();
    }
  });

  await test(`budget ${BUDGET_MB} MiB (< the model): two prompts, different experts, memory and cache within budget + margin`, async () => {
    const { context, page } = await openAt(`${relay.base}/?budget_mb=${BUDGET_MB}`);
    try {
      const m0 = await memory(page);
      assert.equal(m0.budget, BUDGET_MB * MIB);
      const r1 = await ask(page, PROMPTS[0], TOKENS, { engine: 'cpu' });
      const r2 = await ask(page, PROMPTS[1], TOKENS, { engine: 'cpu' });
      assert.deepEqual(r1.ids, expected[0].tokens, 'answer 1 != /chat');
      assert.deepEqual(r2.ids, expected[1].tokens, 'answer 2 != /chat');
      const u1 = new Set(r1.used);
      const only2 = r2.used.filter((x) => !u1.has(x));
      assert.ok(only2.length > 0, 'the two prompts were routed to the same experts');
      const used = new Set([...r1.used, ...r2.used]);
      const m = await memory(page);
      const usedBytes = used.size * model.expertBytes;
      console.log(`  ${used.size} experts used (${(usedBytes / MIB).toFixed(1)} MiB), ${only2.length} only by prompt 2; ` +
        `wasm ${(m0.wasmBytes / MIB).toFixed(1)} → ${(m.wasmBytes / MIB).toFixed(1)} MiB; decoded ${(m.decodedBytes / MIB).toFixed(1)} MiB, ` +
        `served ${(m.servedBytes / MIB).toFixed(1)} MiB, cache ${(m.cacheBytes / MIB).toFixed(1)} MiB (${m.cacheEvicted} evicted)`);
      assert.ok(usedBytes > 2 * BUDGET_MB * MIB, 'the answers must need more experts than the budget holds');
      assert.ok(m.decodedBytes + m.servedBytes <= m.budget, 'decoded + served within the budget');
      // wasm memory: what the answers added stays within budget + margin.
      assert.ok(m.wasmBytes - m0.wasmBytes <= m.budget + WASM_MARGIN,
        `wasm memory grew by ${((m.wasmBytes - m0.wasmBytes) / MIB).toFixed(1)} MiB`);
      // IndexedDB: experts within the budget, the core blocks on top.
      assert.ok(m.cacheBytes <= m.budget + m.startupBytes, `cache ${m.cacheBytes} bytes`);
      const idb = await page.evaluate(() => new Promise((res, rej) => {
        const o = indexedDB.open('aiblock');
        o.onsuccess = () => {
          const tx = o.result.transaction('sizes');
          const q = tx.objectStore('sizes').getAll();
          q.onsuccess = () => res(q.result.reduce((n, x) => n + x, 0));
          q.onerror = () => rej(q.error);
        };
        o.onerror = () => rej(o.error);
      }));
      assert.equal(idb, m.cacheBytes, 'the panel counts what IndexedDB holds');
      assert.ok(m.cacheEvicted > 0, 'the cache evicted experts to stay within the budget');
    } finally {
      await context.close();
    }
  });

  await test(`a fake ${QUOTA / MIB} MiB quota: experts evicted, core blocks kept, the page answers`, async () => {
    // IndexedDB refuses a payload write past the quota, as a full one does.
    const fakeQuota = (quota) => {
      const put = IDBObjectStore.prototype.put;
      const del = IDBObjectStore.prototype.delete;
      const held = new Map();
      let used = 0;
      window.__quotaRefusals = 0;
      IDBObjectStore.prototype.put = function (value, key) {
        if (this.name === 'payloads' && value && value.bytes) {
          const n = value.bytes.byteLength;
          if (used - (held.get(key) ?? 0) + n > quota) {
            window.__quotaRefusals += 1;
            throw new DOMException('fake quota reached', 'QuotaExceededError');
          }
          used += n - (held.get(key) ?? 0);
          held.set(key, n);
        }
        return put.call(this, value, key);
      };
      IDBObjectStore.prototype.delete = function (key) {
        if (this.name === 'payloads' && held.has(key)) {
          used -= held.get(key);
          held.delete(key);
        }
        return del.call(this, key);
      };
    };
    const { context, page } = await openAt(`${relay.base}/`, { fn: fakeQuota, arg: QUOTA });
    try {
      const r = await ask(page, PROMPTS[0], TOKENS, { engine: 'cpu' });
      assert.equal(r.state, 'done', JSON.stringify(r));
      assert.deepEqual(r.ids, expected[0].tokens, 'page ids != relay /chat ids');
      const refusals = await page.evaluate(() => window.__quotaRefusals);
      const m = await memory(page);
      const node = await readNode(page);
      console.log(`  ${refusals} writes refused by the fake quota, ${m.cacheEvicted} experts evicted; cache ${(m.cacheBytes / MIB).toFixed(2)} MiB in ${m.cacheEntries} blocks`);
      assert.ok(refusals > 0, 'the fake quota never refused a write');
      assert.ok(m.cacheEvicted > 0, 'no expert was evicted');
      assert.ok(m.cacheBytes <= QUOTA);
      assert.ok(!node.alerts.some((x) => x.kind === 'storage-full'), `alerts: ${JSON.stringify(node.alerts)}`);
      const keys = await page.evaluate(() => new Promise((res, rej) => {
        const o = indexedDB.open('aiblock');
        o.onsuccess = () => {
          const q = o.result.transaction('payloads').objectStore('payloads').getAllKeys();
          q.onsuccess = () => res(q.result);
          q.onerror = () => rej(q.error);
        };
        o.onerror = () => rej(o.error);
      }));
      const missingCore = [...core].filter((h) => !keys.includes(h));
      assert.deepEqual(missingCore, [], 'meta, shared and router blocks stay cached');
      await page.screenshot({ path: path.join(outDir(), 'scale-quota.png'), fullPage: false });
    } finally {
      await context.close();
    }
  });
} finally {
  await browser.close();
  await relay.stop();
}
fs.rmSync(tmp, { recursive: true, force: true });
const failed = results.filter((r) => !r.ok);
console.log(`scale: ${results.length - failed.length}/${results.length} passed`);
if (failed.length) {
  console.log(relay.log().split('\n').slice(-30).join('\n'));
  process.exit(1);
}
