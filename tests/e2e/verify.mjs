// Browser end-to-end tests: the real relay serves the trunk build (dist/),
// headless Chromium opens it, and the wasm node verifies every block.
//
//   node tests/e2e/verify.mjs
//
// Env: AIBLOCK_RELAY_BIN (default $CARGO_TARGET_DIR/debug/relay), AIBLOCK_DIST
// (default dist/), AIBLOCK_MODEL (default models/default), AIBLOCK_CHROMIUM
// (default /usr/bin/chromium), AIBLOCK_REQUIRE_GPU=1 (fail when the page sees
// no WebGPU adapter).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_ARGS, REPO, aiblockBin, chromiumPath, listChain, openAndReport, startRelay, startTamperProxy,
} from './lib.mjs';

const results = [];
async function test(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`PASS ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name}\n${e.stack || e}`);
  }
}

async function listing(base) {
  const a = await listChain(base, 'A');
  const b = await listChain(base, 'B');
  return { a, b, hashes: [...a, ...b].map((x) => x.hash) };
}

/** Blocks nothing else depends on (as the page reports parents and meta links). */
function leaves(rows) {
  const used = new Set();
  for (const r of rows) {
    for (const p of (r.parents || '').split(',').filter(Boolean)) used.add(p);
    if (r.meta) used.add(r.meta);
  }
  return rows.filter((r) => !used.has(r.hash));
}

function flip(buf, at) {
  const out = Buffer.from(buf);
  out[at] ^= 0x01;
  return out;
}

const relay = await startRelay();
console.log(`relay: ${relay.args}`);
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
console.log(`chromium ${browser.version()}`);
let honestRows = [];

try {
  await test('every block the relay lists is verified in the browser', async () => {
    const { a, b, hashes } = await listing(relay.base);
    assert.ok(a.length >= 1, 'the relay lists no chain-A (genesis) block');
    const r = await openAndReport(browser, `${relay.base}/`);
    console.log(`  page: ${r.text} | ${r.progress}`);
    console.log(`  relay lists ${a.length} chain-A and ${b.length} chain-B blocks`);
    assert.equal(r.error, null, `page could not fetch the chain: ${r.error}`);
    const bad = r.rows.filter((x) => x.status !== 'verified');
    assert.deepEqual(bad, [], 'blocks that failed verification');
    assert.equal(r.total, hashes.length, 'page total != relay block count');
    assert.equal(r.verified, hashes.length);
    assert.equal(r.failed, 0);
    assert.deepEqual(r.rows.map((x) => x.hash).sort(), [...hashes].sort(), 'rows != listed hashes');
    const chains = (c) => r.rows.filter((x) => x.chain === c).length;
    assert.equal(chains('A'), a.length);
    assert.equal(chains('B'), b.length);
    honestRows = r.rows;
  });

  await test('chat in the page runs the verified model and matches native greedy decoding', async () => {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    try {
      await page.goto(`${relay.base}/`);
      await page.waitForSelector('#summary[data-total]', { timeout: 180_000 });
      const state = await page.getAttribute('#chat', 'data-state');
      assert.equal(state, 'ready', `chat not ready: ${await page.textContent('#chat').catch(() => '(no #chat)')}`);
      const prompt = 'Q: 23+45=? A:';
      await page.fill('#prompt', prompt);
      await page.fill('#max-tokens', '16');
      await page.click('#send');
      await page.waitForSelector('#reply[data-state="done"], #reply[data-state="error"]', { timeout: 180_000 });
      const reply = await page.textContent('#reply');
      const replyState = await page.getAttribute('#reply', 'data-state');
      console.log(`  page: ${JSON.stringify(prompt)} -> ${JSON.stringify(reply)} | ${await page.textContent('#chat-stats')}`);
      assert.equal(replyState, 'done', `chat failed: ${reply}`);
      assert.ok(reply.length > 0, 'empty reply');
      const bin = aiblockBin();
      const model = process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
      if (bin && fs.existsSync(path.join(model, 'config.json'))) {
        const native = execFileSync(bin, ['chat', '--model', model, '--prompt', prompt, '--max-tokens', '16', '--threads', '1'],
          { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).replace(/\n$/, '');
        console.log(`  native aiblock chat: ${JSON.stringify(native)}`);
        assert.equal(reply, native, 'browser (wasm) and native greedy decoding differ');
      } else {
        console.log('  (aiblock binary or models/default missing: no native comparison)');
      }
    } finally {
      await ctx.close();
    }
  });

  await test('chat on the WebGPU engine in the page matches native greedy decoding', async () => {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    try {
      await page.goto(`${relay.base}/`);
      await page.waitForSelector('#summary[data-total]', { timeout: 180_000 });
      const hasAdapter = await page.evaluate(async () => !!(navigator.gpu && await navigator.gpu.requestAdapter()));
      if (!hasAdapter) {
        assert.notEqual(process.env.AIBLOCK_REQUIRE_GPU, '1', 'AIBLOCK_REQUIRE_GPU=1 but the page has no WebGPU adapter');
        console.log('  SKIPPED: no WebGPU adapter in this browser');
        return;
      }
      const prompt = 'Q: 17+38=? A:';
      await page.fill('#prompt', prompt);
      await page.fill('#max-tokens', '8');
      await page.selectOption('#device', 'gpu');
      await page.click('#send');
      await page.waitForSelector('#reply[data-state="done"], #reply[data-state="error"]', { timeout: 300_000 });
      const reply = await page.textContent('#reply');
      console.log(`  page (GPU): ${JSON.stringify(prompt)} -> ${JSON.stringify(reply)} | ${await page.textContent('#chat-stats')}`);
      assert.equal(await page.getAttribute('#reply', 'data-state'), 'done', `GPU chat failed: ${reply}`);
      assert.equal(await page.getAttribute('#reply', 'data-engine'), 'gpu');
      const bin = aiblockBin();
      const model = process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
      if (bin && fs.existsSync(path.join(model, 'config.json'))) {
        const native = execFileSync(bin, ['chat', '--model', model, '--prompt', prompt, '--max-tokens', '8', '--threads', '1'],
          { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).replace(/\n$/, '');
        console.log(`  native aiblock chat (CPU): ${JSON.stringify(native)}`);
        assert.equal(reply, native, 'WebGPU engine in the browser and native CPU greedy decoding differ');
      }
    } finally {
      await ctx.close();
    }
  });

  await test('WebGPU adapter in headless Chromium', async () => {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(`${relay.base}/`);
    const info = await page.evaluate(async () => {
      if (!navigator.gpu) return { gpu: false };
      const a = await navigator.gpu.requestAdapter();
      if (!a) return { gpu: true, adapter: null };
      const i = a.info || {};
      return {
        gpu: true,
        adapter: { vendor: i.vendor, architecture: i.architecture, description: i.description },
        maxComputeInvocationsPerWorkgroup: a.limits.maxComputeInvocationsPerWorkgroup,
        maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize,
        shaderF16: a.features.has('shader-f16'),
      };
    });
    await ctx.close();
    console.log(`  navigator.gpu: ${JSON.stringify(info)}`);
    if (process.env.AIBLOCK_REQUIRE_GPU === '1') {
      assert.ok(info.adapter, 'AIBLOCK_REQUIRE_GPU=1 but the page got no WebGPU adapter');
    } else if (!info.adapter) {
      console.log('  (no WebGPU adapter; not required because AIBLOCK_REQUIRE_GPU is not 1)');
    }
  });

  await test('tampered payload and tampered envelope are reported failed', async () => {
    assert.ok(honestRows.length > 0, 'needs the honest run');
    const ls = leaves(honestRows);
    // Prefer chain-B leaves (experts); a chain with only its genesis block has just that one.
    const pick = [...ls.filter((x) => x.chain === 'B'), ...ls.filter((x) => x.chain === 'A')];
    const payloadVictim = pick[0].hash;
    const envelopeVictim = pick.length > 1 ? pick[1].hash : null;
    const proxy = await startTamperProxy(relay.base, (url, body) => {
      if (url === `/blocks/${payloadVictim}/payload` && body.length > 0) {
        return flip(body, body.length >> 1); // one bit in the middle of the payload
      }
      if (envelopeVictim && url === `/blocks/${envelopeVictim}?format=bin` && body.length > 0) {
        return flip(body, body.length - 1); // one bit of the signature
      }
      return null;
    });
    try {
      const r = await openAndReport(browser, `${proxy.base}/`);
      console.log(`  page: ${r.text}`);
      const byHash = Object.fromEntries(r.rows.map((x) => [x.hash, x]));
      assert.equal(byHash[payloadVictim]?.status, 'failed', `tampered payload not reported: ${JSON.stringify(byHash[payloadVictim])}`);
      assert.match(byHash[payloadVictim].result, /payload root mismatch/);
      const expectFailed = envelopeVictim ? 2 : 1;
      if (envelopeVictim) {
        assert.equal(byHash[envelopeVictim]?.status, 'failed', `tampered envelope not reported: ${JSON.stringify(byHash[envelopeVictim])}`);
        assert.match(byHash[envelopeVictim].result, /hash mismatch/);
      }
      assert.equal(r.failed, expectFailed, 'only the tampered blocks fail');
      assert.equal(r.verified, r.total - expectFailed);
      assert.equal(r.total, honestRows.length);
    } finally {
      await proxy.close();
    }
  });

  await test("a payload corrupted on the relay's disk is reported failed", async () => {
    const ls = leaves(honestRows);
    const victim = [...ls.filter((x) => x.chain === 'B'), ...ls][0].hash;
    // Content-addressed block files: find the one named by the hash.
    const found = [];
    const walk = (d) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (e.name.includes(victim)) found.push(p);
      }
    };
    walk(relay.dataDir);
    assert.ok(found.length > 0, `no file named after block ${victim} under ${relay.dataDir}`);
    for (const f of found) {
      const buf = fs.readFileSync(f);
      fs.writeFileSync(f, flip(buf, buf.length - 1)); // last byte: the payload's end
    }
    console.log(`  corrupted ${found.map((f) => path.relative(relay.dataDir, f)).join(', ')}`);
    const r = await openAndReport(browser, `${relay.base}/`);
    console.log(`  page: ${r.text}`);
    const row = r.rows.find((x) => x.hash === victim);
    assert.equal(row?.status, 'failed', `corrupted block not reported failed: ${JSON.stringify(row)}`);
    console.log(`  reported: ${row.result}`);
    assert.equal(r.failed, 1);
    assert.equal(r.verified, r.total - 1);
  });
} finally {
  await browser.close();
  await relay.stop();
  if (results.some((x) => !x.ok)) {
    console.log(`--- relay log (${relay.dataDir}) ---\n${relay.log().slice(-4000)}`);
  } else {
    fs.rmSync(relay.dataDir, { recursive: true, force: true });
  }
}

const failed = results.filter((x) => !x.ok);
console.log(`\n${results.length - failed.length} passed, ${failed.length} failed`);
process.exit(failed.length ? 1 : 0);
