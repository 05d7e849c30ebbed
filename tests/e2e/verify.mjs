// Browser end-to-end tests: the real relay serves the trunk build (dist/),
// headless Chromium opens it, and the wasm node verifies every block header,
// fetches only the payloads it needs (meta, shared, routers at load; an
// expert when the router picks it), chunk by chunk, and chats.
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
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_ARGS, REPO, aiblockBin, ask, chromiumPath, listChain, openAndReport, openPage, outDir,
  payloadRequestHash, readPage, startRelay, startTamperProxy, unseenWords,
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

/** The payloads a header-first page needs to start: chain A, shared and routers (heads). */
function startupHashes(a, b) {
  const heads = b.filter((x) => x.is_head && (x.name === 'shared' || /^layer\d+\.router$/.test(x.name)));
  return new Set([...a.map((x) => x.hash), ...heads.map((x) => x.hash)]);
}

const mib = (n) => `${(n / (1024 * 1024)).toFixed(2)} MiB`;

/** Native greedy decoding with the CLI, or null when the binary or model is missing. */
function nativeChat(prompt, maxTokens) {
  const bin = aiblockBin();
  const model = process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
  if (!bin || !fs.existsSync(path.join(model, 'config.json'))) return null;
  return execFileSync(bin, ['chat', '--model', model, '--prompt', prompt, '--max-tokens', String(maxTokens), '--threads', '1'],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).replace(/\n$/, '');
}

/** Send one prompt from the page's chat form (greedy); resolves what the reply shows. */
async function chat(page, prompt, maxTokens, engine = 'cpu', timeout = 180_000) {
  const r = await ask(page, prompt, maxTokens, { engine, timeout });
  return {
    text: r.text,
    state: r.state,
    engine: r.engine ?? null,
    used: r.used,
    fetched: r.fetched,
    pipelined: r.pipelined ?? null,
    stats: await page.evaluate(() => document.getElementById('chat-stats')?.textContent ?? ''),
  };
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
const CHAT_PROMPT = 'Q: 23+45=? A:';
let chatExperts = []; // block hashes of the experts the CPU chat fetched

try {
  await test('every header is verified and only the meta, shared and router payloads are fetched', async () => {
    const { a, b, hashes } = await listing(relay.base);
    assert.ok(a.length >= 1, 'the relay lists no chain-A (genesis) block');
    const { page, context, report: r, payloadHashes } = await openPage(browser, `${relay.base}/`);
    try {
      console.log(`  page: ${r.text} | ${r.progress}`);
      console.log(`  ${r.fetch?.text}`);
      console.log(`  relay lists ${a.length} chain-A and ${b.length} chain-B blocks`);
      assert.equal(r.error, null, `page could not fetch the chain: ${r.error}`);
      const bad = r.rows.filter((x) => x.status !== 'verified');
      assert.deepEqual(bad, [], 'blocks that failed verification');
      assert.equal(r.total, hashes.length, 'page total != relay block count');
      assert.equal(r.verified, hashes.length);
      assert.equal(r.failed, 0);
      assert.deepEqual(r.rows.map((x) => x.hash).sort(), [...hashes].sort(), 'one row per listed block');
      const chains = (c) => r.rows.filter((x) => x.chain === c).length;
      assert.equal(chains('A'), a.length);
      assert.equal(chains('B'), b.length);
      assert.equal(r.chat, 'ready', 'chat not ready');
      // Header-first and lazy: the page asked only for the startup payloads.
      const want = startupHashes(a, b);
      assert.deepEqual([...payloadHashes].sort(), [...want].sort(), 'payloads fetched at load');
      const held = r.rows.filter((x) => x.payload === 'verified').map((x) => x.hash);
      assert.deepEqual(held.sort(), [...want].sort(), 'rows with data-payload="verified"');
      assert.ok(r.rows.filter((x) => !want.has(x.hash)).every((x) => x.payload === 'absent'), 'experts not fetched');
      assert.equal(r.held, want.size);
      assert.equal(r.headerOnly, hashes.length - want.size);
      assert.deepEqual(r.fetch.experts, []);
      const wantBytes = [...a, ...b].filter((x) => want.has(x.hash)).reduce((n, x) => n + x.payload_len, 0);
      assert.equal(r.fetch.payloadBytes, wantBytes, 'payload bytes fetched at load');
      const whole = [...a, ...b].reduce((n, x) => n + x.payload_len, 0);
      assert.equal(r.fetch.modelBytes, whole, 'whole model bytes');
      console.log(`  at load: ${payloadHashes.size} payloads, ${mib(r.fetch.payloadBytes)} of the model's ${mib(whole)} (${r.fetch.requests} requests, ${mib(r.fetch.bytes)} in all)`);
      const shot = path.join(outDir(), 'page-load.png');
      await page.screenshot({ path: shot, fullPage: true });
      console.log(`  screenshot: ${shot}`);
      honestRows = r.rows;
    } finally {
      await context.close();
    }
  });

  await test('chat in the page fetches only the routed experts and matches native greedy decoding', async () => {
    const { page, context, report: r0, payloadHashes } = await openPage(browser, `${relay.base}/`);
    try {
      assert.equal(r0.chat, 'ready', `chat not ready: ${await page.textContent('#chat').catch(() => '(no #chat)')}`);
      const atLoad = new Set(payloadHashes);
      const reply = await chat(page, CHAT_PROMPT, 16);
      console.log(`  page: ${JSON.stringify(CHAT_PROMPT)} -> ${JSON.stringify(reply.text)} | ${reply.stats}`);
      assert.equal(reply.state, 'done', `chat failed: ${reply.text}`);
      assert.equal(reply.engine, 'cpu');
      assert.ok(reply.text.length > 0, 'empty reply');
      const native = nativeChat(CHAT_PROMPT, 16);
      if (native !== null) {
        console.log(`  native aiblock chat: ${JSON.stringify(native)}`);
        assert.equal(reply.text, native, 'browser (wasm) and native greedy decoding differ');
      } else {
        console.log('  (aiblock binary or models/default missing: no native comparison)');
      }
      // Only routed experts were fetched: the first answer fetches exactly the experts it used.
      assert.ok(reply.used.length > 0, 'no experts used');
      assert.deepEqual([...reply.fetched].sort(), [...reply.used].sort(), 'experts fetched != experts routed');
      const r = await readPage(page);
      const bySlot = Object.fromEntries(r.rows.filter((x) => x.chain === 'B').map((x) => [x.slot, x]));
      const usedHashes = reply.used.map((slot) => bySlot[slot]?.hash);
      assert.ok(usedHashes.every(Boolean), `unknown expert slots ${reply.used}`);
      const during = [...payloadHashes].filter((h) => !atLoad.has(h));
      assert.deepEqual(during.sort(), [...usedHashes].sort(), 'payload requests during the chat != routed experts');
      for (const slot of reply.used) assert.equal(bySlot[slot].payload, 'verified', `${slot} row`);
      assert.deepEqual([...r.fetch.experts].sort(), [...reply.used].sort());
      const whole = r.fetch.modelBytes;
      console.log(`  after one answer: ${reply.used.length} experts used and fetched, ${mib(r.fetch.payloadBytes)} of the model's ${mib(whole)} (${(100 * r.fetch.payloadBytes / whole).toFixed(0)}%)`);
      assert.ok(r.fetch.payloadBytes < whole);
      const shot = path.join(outDir(), 'page-chat.png');
      await page.screenshot({ path: shot, fullPage: true });
      console.log(`  screenshot: ${shot}`);
      // The same prompt again: every expert is held, nothing is fetched.
      const before = payloadHashes.size;
      const again = await chat(page, CHAT_PROMPT, 16);
      assert.equal(again.text, reply.text);
      assert.deepEqual(again.fetched, [], 'experts fetched again');
      assert.equal(payloadHashes.size, before, 'payload requests on the second answer');
      chatExperts = usedHashes;
    } finally {
      await context.close();
    }
  });

  await test('chat on the WebGPU engine in the page matches native greedy decoding', async () => {
    const { page, context, payloadHashes } = await openPage(browser, `${relay.base}/`);
    try {
      const hasAdapter = await page.evaluate(async () => !!(navigator.gpu && await navigator.gpu.requestAdapter()));
      if (!hasAdapter) {
        assert.notEqual(process.env.AIBLOCK_REQUIRE_GPU, '1', 'AIBLOCK_REQUIRE_GPU=1 but the page has no WebGPU adapter');
        console.log('  SKIPPED: no WebGPU adapter in this browser');
        return;
      }
      const atLoad = new Set(payloadHashes);
      // A copy of words made here: an answer of several tokens, decoded
      // with each next token submitted before the last is read back.
      const words = unseenWords(3, Date.now());
      const prompt = `Q: copy ${words.join(' ')} A:`;
      const reply = await chat(page, prompt, 16, 'gpu', 300_000);
      console.log(`  page (GPU): ${JSON.stringify(prompt)} -> ${JSON.stringify(reply.text)} (${reply.pipelined} tokens pipelined) | ${reply.stats}`);
      assert.ok(Number(reply.pipelined) > 0, `no token of the GPU answer was pipelined (${reply.pipelined})`);
      assert.equal(reply.state, 'done', `GPU chat failed: ${reply.text}`);
      assert.equal(reply.engine, 'gpu');
      const native = nativeChat(prompt, 16);
      if (native !== null) {
        console.log(`  native aiblock chat (CPU): ${JSON.stringify(native)}`);
        assert.equal(reply.text, native, 'WebGPU engine in the browser and native CPU greedy decoding differ');
      }
      const r = await readPage(page);
      const bySlot = Object.fromEntries(r.rows.filter((x) => x.chain === 'B').map((x) => [x.slot, x]));
      const during = [...payloadHashes].filter((h) => !atLoad.has(h));
      assert.deepEqual(during.sort(), reply.fetched.map((s) => bySlot[s].hash).sort(), 'payload requests != experts the engine asked for');
      assert.ok(reply.fetched.every((s) => /^layer\d+\.expert\d+$/.test(s)));
    } finally {
      await context.close();
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

  await test('a tampered listing entry and a tampered payload chunk are reported failed', async () => {
    assert.ok(honestRows.length > 0, 'needs the honest run');
    const ls = leaves(honestRows).filter((x) => x.chain === 'B' && /\.expert\d+$/.test(x.slot));
    assert.ok(ls.length > 0, 'no chain-B expert leaf');
    const headerVictim = ls[0].hash;
    // A router: its payload is fetched at load.
    const payloadVictim = honestRows.find((x) => /^layer\d+\.router$/.test(x.slot)).hash;
    const proxy = await startTamperProxy(relay.base, (url, body) => {
      if (url.startsWith('/chain/B/blocks')) {
        const j = JSON.parse(body.toString());
        for (const x of j) if (x.hash === headerVictim) x.address = 'mallory';
        return Buffer.from(JSON.stringify(j));
      }
      if (payloadRequestHash(`http://x${url}`) === payloadVictim && url.endsWith('/payload') && body.length > 0) {
        return flip(body, body.length >> 1); // one bit of one chunk
      }
      return null;
    });
    try {
      const { page, context, report: r } = await openPage(browser, `${proxy.base}/`);
      try {
        console.log(`  page: ${r.text}`);
        const byHash = Object.fromEntries(r.rows.map((x) => [x.hash, x]));
        const hv = byHash[headerVictim];
        assert.equal(hv?.status, 'failed', `tampered listing entry not reported: ${JSON.stringify(hv)}`);
        assert.match(hv.result, /hash mismatch/);
        const pv = byHash[payloadVictim];
        assert.equal(pv?.status, 'failed', `tampered payload not reported: ${JSON.stringify(pv)}`);
        assert.equal(pv.payload, 'failed');
        console.log(`  reported: ${pv.result}`);
        assert.match(pv.result, /chunk \d+ of block [0-9a-f]+ does not match its hash/);
        assert.equal(r.failed, 2, 'only the tampered blocks fail');
        assert.equal(r.verified, r.total - 2);
        assert.equal(r.total, honestRows.length);
        assert.equal(r.chat, 'unavailable', 'a model with a refused router must not chat');
        await page.screenshot({ path: path.join(outDir(), 'page-tampered.png'), fullPage: true });
      } finally {
        await context.close();
      }
    } finally {
      await proxy.close();
    }
    // A relay that cannot list: its error is shown as text, never markup.
    const down = await startTamperProxy(relay.base, (url) =>
      (url.startsWith('/chain/A/blocks') ? { status: 503, body: '<b>down</b>' } : null));
    try {
      const { page, context, report: r } = await openPage(browser, `${down.base}/`);
      try {
        assert.match(r.error ?? '', /HTTP 503.*<b>down<\/b>/);
        assert.equal(await page.evaluate(() => document.querySelectorAll('#summary b').length), 0);
      } finally {
        await context.close();
      }
    } finally {
      await down.close();
    }
  });

  await test('a second version signed by a hostile address: verified, head, address shown as text', async () => {
    const bin = aiblockBin();
    if (!bin) {
      console.log('  SKIPPED: no aiblock binary');
      return;
    }
    const model = process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
    const r2 = await startRelay({ extraArgs: ['--gate', 'accept-all'] });
    const work = fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-e2e-miner-'));
    try {
      const hostile = 'alice <script>window.__pwned = 1</script> & "bob" \'eve\'';
      const key = path.join(work, 'key');
      const run = (args) => execFileSync(bin, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
      run(['keygen', '--out', key]);
      const [meta] = await listChain(r2.base, 'A');
      const out = path.join(work, 'blocks');
      run(['import', '--model', model, '--relay', r2.base, '--meta-hash', meta.hash, '--address', hostile, '--key', key, '--out', out]);
      const one = path.join(work, 'one');
      fs.mkdirSync(one);
      fs.copyFileSync(path.join(out, 'layer0.expert2.block'), path.join(one, 'layer0.expert2.block'));
      run(['publish', '--relay', r2.base, '--dir', one]);
      const { page, context, report: r } = await openPage(browser, `${r2.base}/`);
      try {
        console.log(`  page: ${r.text}`);
        assert.equal(r.failed, 0);
        const versions = r.rows.filter((x) => x.slot === 'layer0.expert2');
        assert.equal(versions.length, 2);
        const v2 = versions.find((x) => x.version === '2');
        assert.ok(v2, `no version 2: ${JSON.stringify(versions)}`);
        assert.equal(v2.status, 'verified');
        assert.equal(v2.payload, 'absent', 'an expert is not fetched at load');
        // The miner address is user input: shown as text, never markup.
        assert.equal(v2.address, hostile);
        assert.equal(await page.evaluate(() => window.__pwned), undefined, 'hostile address ran as script');
        assert.equal(await page.evaluate(() => document.querySelectorAll('#app script').length), 0);
        assert.equal(await page.evaluate((h) => document.querySelector(`tr[data-hash="${h}"]`).dataset.head, v2.hash), 'true');
        assert.equal(r.chat, 'ready');
      } finally {
        await context.close();
      }
    } finally {
      await r2.stop();
      fs.rmSync(work, { recursive: true, force: true });
    }
  });

  await test("an expert corrupted on the relay's disk is refused when the router picks it", async () => {
    assert.ok(chatExperts.length > 0, 'needs the CPU chat run');
    const victim = chatExperts[0];
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
    const { page, context, report: r } = await openPage(browser, `${relay.base}/`);
    try {
      // Header-first: nothing at load touches the expert's payload.
      assert.equal(r.failed, 0, `a failure before the expert was needed: ${r.text}`);
      const reply = await chat(page, CHAT_PROMPT, 16);
      console.log(`  reply: ${reply.text}`);
      assert.equal(reply.state, 'error');
      const after = await readPage(page);
      const row = after.rows.find((x) => x.hash === victim);
      assert.equal(row?.status, 'failed', `corrupted block not reported failed: ${JSON.stringify(row)}`);
      assert.equal(row.payload, 'failed');
      console.log(`  reported: ${row.result}`);
      assert.equal(after.failed, 1);
      assert.equal(after.verified, after.total - 1);
    } finally {
      await context.close();
    }
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
