// A quantized default model as a second model on the chain, in headless
// Chromium (SwiftShader WebGPU):
// 1. `aiblock quantize` publishes models/default at q8_0 to a relay (its own
//    meta block, every block naming its source); `aiblock verify-quant`
//    re-derives every expert;
// 2. browser 1 opens /?model=default-q8_0: every header verifies, the answer
//    equals the relay's /chat on that model, and only q8_0 expert blocks are
//    downloaded (about a quarter of the f32 bytes);
// 3. browser 2 opens the same model and gets q8_0 expert chunks from
//    browser 1 through the relay.
// Screenshots go to $AIBLOCK_E2E_OUT (default target/e2e).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  CHROMIUM_ARGS, aiblockBin, ask, chromiumPath, getJson, listChain, outDir, readNode, startRelay, trackWire,
} from './lib.mjs';

const PROMPT = 'Q: 38+45=? A:';
const MAX_TOKENS = 6;
const FORMAT = 'q8_0';
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

function run(args) {
  const bin = aiblockBin();
  assert.ok(bin, 'aiblock not built (cargo build -p miner --bin aiblock)');
  const r = spawnSync(bin, args, { encoding: 'utf8' });
  assert.equal(r.status, 0, `aiblock ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const relay = await startRelay();
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-quant-'));
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
let q = null; // the quantized model as listed
let b1 = null;
let peer1 = null;
let expected = null;
try {
  await test('aiblock quantize publishes the q8_0 model, verify-quant re-derives it', async () => {
    const out = run(['quantize', '--relay', relay.base, '--quant', FORMAT, '--key', path.join(relay.dataDir, 'operator.key'), '--out', path.join(work, 'blocks')]);
    console.log(`  ${out.trim().split('\n').join('\n  ')}`);
    const a = await listChain(relay.base, 'A');
    const b = await listChain(relay.base, 'B');
    const meta = a.find((x) => x.name === `default-${FORMAT}`);
    assert.ok(meta, `no default-${FORMAT} meta block in ${a.map((x) => x.name)}`);
    const src = a.find((x) => x.name === 'default');
    assert.deepEqual(meta.parents, [src.hash], 'the quantized meta block names its source');
    const heads = b.filter((x) => x.is_head && x.meta === meta.hash);
    const experts = heads.filter((x) => /expert/.test(x.name));
    assert.equal(experts.length, 32);
    for (const e of experts) {
      assert.equal(e.dtype, 'Q8_0', `${e.name} dtype`);
      const parent = b.find((x) => x.hash === e.parents[0]);
      assert.ok(parent && parent.name === e.name && parent.meta === src.hash, `${e.name} names its float source`);
      assert.ok(e.payload_len * 3 < parent.payload_len, `${e.name}: ${e.payload_len} vs ${parent.payload_len} bytes`);
    }
    const v = run(['verify-quant', '--relay', relay.base]);
    assert.match(v, /32 quantized blocks re-derive exactly/);
    q = { meta, heads, byHash: Object.fromEntries(b.map((x) => [x.hash, x])) };
    const r = await fetch(`${relay.base}/chat`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: PROMPT, max_tokens: MAX_TOKENS, model: `default-${FORMAT}` }),
    });
    assert.equal(r.status, 200);
    expected = await r.json();
    assert.equal(expected.model, meta.hash);
    console.log(`  relay /chat on default-${FORMAT}: ${JSON.stringify(expected.response)} ids [${expected.tokens}]`);
  });

  await test('browser 1 runs the q8_0 model: verified, same answer as the relay, only q8_0 experts fetched', async () => {
    assert.ok(q && expected, 'needs the quantized model');
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await ctx.newPage();
    const wire = trackWire(page);
    await page.goto(`${relay.base}/?model=default-${FORMAT}`);
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: 180_000 });
    await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 });
    const s = await readNode(page);
    assert.equal(Number(s.summary.failed), 0);
    peer1 = s.net.peerId;
    const reply = await ask(page, PROMPT, MAX_TOKENS);
    console.log(`  browser 1: ${JSON.stringify(reply.text)} ids [${reply.ids}] engine ${reply.engine}, experts used ${reply.used.length}`);
    assert.equal(reply.state, 'done');
    assert.deepEqual(reply.ids, expected.tokens, 'browser ids != relay /chat ids on the q8_0 model');
    const got = wire.since(0);
    const experts = [...got.blocks].map((h) => q.byHash[h]).filter((x) => x && /expert/.test(x.name));
    assert.ok(experts.length > 0, 'no expert downloaded');
    for (const e of experts) assert.equal(e.dtype, 'Q8_0', `${e.name} fetched from the float model`);
    b1 = { ctx, page, wire };
    await page.screenshot({ path: path.join(outDir(), 'quant-answer.png'), fullPage: true });
  });

  await test('browser 2 gets q8_0 expert chunks from browser 1', async () => {
    assert.ok(b1 && peer1, 'needs browser 1');
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    try {
      const page = await ctx.newPage();
      const wire = trackWire(page);
      // Relay forwarding (direct transfer is tests/e2e/direct.mjs's).
      await page.goto(`${relay.base}/?model=default-${FORMAT}&direct=0`);
      await page.waitForSelector('#summary[data-phase="done"]', { timeout: 180_000 });
      await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 });
      const reply = await ask(page, PROMPT, MAX_TOKENS);
      assert.deepEqual(reply.ids, expected.tokens);
      const w = wire.since(0);
      const fromPeer = w.chunks.filter((c) => c.from === peer1 && q.byHash[c.block]?.dtype === 'Q8_0');
      console.log(`  browser 2: ${fromPeer.length} q8_0 expert chunks (${fromPeer.reduce((n, c) => n + c.bytes, 0)} bytes) from browser 1`);
      assert.ok(fromPeer.length > 0, 'no q8_0 expert chunk came from browser 1');
      const stats = await getJson(`${relay.base}/p2p/stats`);
      assert.ok((stats.per_peer?.[peer1]?.bytes_served ?? 0) > 0, 'the relay credits browser 1 nothing');
    } finally {
      await ctx.close();
    }
  });
} finally {
  await browser.close();
  await relay.stop();
}
const failed = results.filter((r) => !r.ok);
console.log(`quant: ${results.length - failed.length}/${results.length} passed`);
if (failed.length) {
  console.log(relay.log().split('\n').slice(-30).join('\n'));
  process.exit(1);
}
