// Browser-node end-to-end tests (issue 11, "Must show"): the real relay
// serves the trunk build, headless Chromium pages become nodes on its /ws
// network, and the test checks what they download, from whom, what they
// cache and serve, against what the pages say and the relay's counters.
//
//   node tests/e2e/node.mjs
//
// 1. browser 1: the whole chain verifies; a greedy answer streams and its
//    token ids equal the native engine's; the only payloads that reach the
//    page (REST requests and /ws ChunkData frames, decoded here) are the
//    startup blocks and the experts the answer used.
// 2. browser 2 (another context) gets expert chunks from browser 1 through
//    the relay: its #net counts bytes from peers, the frames name browser 1,
//    and the relay's /p2p/stats credits browser 1's key with those bytes.
// 3. browser 1 reloads: nothing downloaded, the answer comes from IndexedDB;
//    a cache entry corrupted by the test is caught, dropped and fetched
//    again; the clear button empties the cache.
// 4. a native peer serving corrupt chunks (miner example corrupt_peer) is
//    caught and banned by the relay, and a fresh page's answer still comes.
// 5. Chromium without WebGPU answers on the CPU path and says so; the stop
//    button stops an answer.
// 6. the page's own counts (cache panel, experts held, the chat's summary)
//    agree with what it holds, after an answer and after a reload.
// 7. a fresh browser copies words no training example contained.
// 8. the page's fixed-length decode (window.wasmBindings.bench_decode, the
//    browser decode benchmark's entry point) gives N tokens, EOS ignored,
//    equal to the native CPU reference's; bad input is refused.
// Screenshots go to target/e2e/node-*.png.
//
// Env: as verify.mjs, plus AIBLOCK_E2E_ENGINE (gpu|cpu: the engine browser
// pages use; default: the page's own plan), AIBLOCK_E2E_ONLY (comma-separated
// test numbers to run, e.g. "1,5").

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_ARGS, ask, chromiumPath, get, getJson, listChain, modelDir, nativeGreedy, outDir, readNode,
  numberedTests, sleep, startCorruptPeer, startRelay, trackWire, unseenWords, until,
} from './lib.mjs';

// Greedy: " dog cat green blue red" (5 tokens), 11 of the 32 experts.
const PROMPT = process.env.AIBLOCK_E2E_PROMPT || 'Q: reverse red blue green cat dog A:';
const MAX_TOKENS = Number(process.env.AIBLOCK_E2E_MAX_TOKENS || 8);
const ENGINE = process.env.AIBLOCK_E2E_ENGINE || null;
const ONLY = (process.env.AIBLOCK_E2E_ONLY || '').split(',').filter(Boolean).map(Number);
const LOAD_TIMEOUT = 180_000;
const VIEWPORT = { width: 1280, height: 900 };

const { test, results } = numberedTests(ONLY);

const mib = (n) => `${(n / (1024 * 1024)).toFixed(2)} MiB`;
const sorted = (it) => [...it].sort();
const sha256 = (b) => crypto.createHash('sha256').update(b).digest('hex');
const truthy = (v) => v !== undefined && v !== '' && v !== 'false' && v !== '0' && v !== 'no';

/** The relay's listing: blocks by hash, slot heads by name, the startup set. */
async function chainInfo(base) {
  const a = await listChain(base, 'A');
  const b = await listChain(base, 'B');
  const byHash = Object.fromEntries([...a, ...b].map((x) => [x.hash, x]));
  const heads = Object.fromEntries(b.filter((x) => x.is_head).map((x) => [x.name, x.hash]));
  // What a header-first node fetches at start: the meta payloads, the shared block and the routers.
  const startup = new Set([
    ...a.map((x) => x.hash),
    ...b.filter((x) => x.is_head && (x.name === 'shared' || /^layer\d+\.router$/.test(x.name))).map((x) => x.hash),
  ]);
  const bytes = (hs) => [...hs].reduce((n, h) => n + (byHash[h]?.payload_len ?? 0), 0);
  const whole = [...a, ...b].filter((x) => x.chain === 'A' || x.is_head).reduce((n, x) => n + x.payload_len, 0);
  return { a, b, byHash, heads, startup, bytes, whole, total: a.length + b.length };
}

/** Block hashes of a list of experts as the page names them (slot names or hashes). */
function hashesOf(list, chain) {
  return new Set(list.map((x) => {
    if (/^[0-9a-f]{64}$/.test(x)) return x;
    const h = chain.heads[x];
    assert.ok(h, `the page names an unknown expert ${JSON.stringify(x)}`);
    return h;
  }));
}

/** Open a node page in `context` with a wire tracker; wait until it is loaded and online. */
async function openNode(context, url) {
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
  const wire = trackWire(page);
  await page.goto(url);
  await waitLoaded(page, consoleLines);
  return { page, wire, consoleLines };
}

async function waitLoaded(page, consoleLines = []) {
  try {
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: LOAD_TIMEOUT });
    await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 });
  } catch (e) {
    const now = await readNode(page).catch(() => null);
    throw new Error(`page not loaded and online: ${e.message}\nnet: ${JSON.stringify(now?.net)}\nsummary: ${JSON.stringify(now?.summary)}\nalerts: ${JSON.stringify(now?.alerts)}\nconsole:\n${consoleLines.slice(-30).join('\n')}`);
  }
}

async function shot(page, name) {
  const p = path.join(outDir(), name);
  await page.screenshot({ path: p, fullPage: true });
  console.log(`  screenshot: ${p}`);
}


/** The answer checks every test shares: done, streamed, greedy ids equal native. */
function checkAnswer(reply, native, label) {
  console.log(`  ${label}: ${JSON.stringify(PROMPT)} -> ${JSON.stringify(reply.text)} ids [${reply.ids}] engine ${reply.engine} experts used ${reply.used.length}, fetched ${reply.fetched.length}`);
  assert.equal(reply.state, 'done', `answer did not finish: ${reply.text}`);
  assert.ok(reply.ids.length > 0, 'no generated token ids in #reply[data-token-ids]');
  assert.equal(Number(reply.tokens), reply.ids.length, 'data-tokens != number of data-token-ids');
  if (native) assert.deepEqual(reply.ids, native.ids, `greedy token ids differ from the native engine's (${JSON.stringify(native.text)})`);
  // Streamed: the reply showed intermediate token counts while running.
  const counts = new Set(reply.trace.filter((x) => x.state === 'running' && x.tokens > 0).map((x) => x.tokens));
  if (reply.ids.length >= 3) assert.ok(counts.size >= 2, `not streamed: token counts seen while running: ${[...counts]}`);
}

const num = (v) => Number(v ?? NaN);

// ---------------------------------------------------------------------------

const relay = await startRelay();
console.log(`relay: ${relay.args}`);
const chain = await chainInfo(relay.base);
console.log(`chain: ${chain.a.length} chain-A and ${chain.b.length} chain-B blocks; model ${mib(chain.whole)}, startup set ${chain.startup.size} blocks (${mib(chain.bytes(chain.startup))})`);
const native = await nativeGreedy(PROMPT, MAX_TOKENS);
if (native) console.log(`native greedy (CPU): ${JSON.stringify(native.text)} ids [${native.ids}]`);
else console.log('WARNING: miner example greedy_ids not built (cargo build -p miner --example greedy_ids): no native comparison');
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
console.log(`chromium ${browser.version()}`);

let ctx1 = null;
let b1 = null; // { page, wire, consoleLines }
let peer1 = null;
let used = new Set(); // block hashes of the experts browser 1's answer used
let answerIds = null;

try {
  await test(1, 'browser 1: the chain verifies, a greedy answer streams and equals native, only routed experts are downloaded', async () => {
    ctx1 = await browser.newContext({ viewport: VIEWPORT });
    b1 = await openNode(ctx1, `${relay.base}/`);
    const { page, wire } = b1;
    const s = await readNode(page);
    console.log(`  summary: ${s.summary?.text?.slice(0, 160)}`);
    console.log(`  device: ${JSON.stringify(s.device && { ...s.device, text: undefined })}; net: ${JSON.stringify({ ...s.net, text: undefined })}`);
    assert.equal(num(s.summary.total), chain.total, 'blocks on the page != blocks the relay lists');
    assert.equal(num(s.summary.verified), chain.total, 'not every header verified');
    assert.equal(num(s.summary.failed), 0);
    peer1 = s.net.peerId;
    assert.match(peer1 ?? '', /^[0-9a-f]{64}$/, '#net data-peer-id');
    const load = wire.since(0);
    assert.equal(load.welcome, peer1, "the relay's Welcome names another key than #net data-peer-id");
    assert.deepEqual(sorted(load.blocks), sorted(chain.startup), 'payloads downloaded at load != meta, shared and routers');
    console.log(`  at load: ${load.blocks.size} payloads, ${load.rest.length} REST payload requests, ${load.chunks.length} /ws chunks (${mib(load.chunkBytes)})`);

    const mark = wire.mark();
    const reply = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
    checkAnswer(reply, native, 'browser 1');
    answerIds = reply.ids;
    used = hashesOf(reply.used, chain);
    assert.ok(used.size > 0, 'no experts used');
    for (const h of used) assert.match(chain.byHash[h].name, /^layer\d+\.expert\d+$/, `${h} is not an expert`);
    assert.ok(used.size < chain.b.filter((x) => x.is_head && /expert/.test(x.name)).length, 'the answer used every expert: nothing to prove');
    // Only the routed experts' payloads reached the page during the answer.
    const during = wire.since(mark);
    assert.deepEqual(sorted(during.blocks), sorted(used), 'payloads downloaded during the answer != experts it used');
    assert.deepEqual(sorted(hashesOf(reply.fetched, chain)), sorted(used), 'data-experts-fetched != data-experts-used on the first answer');
    // Each chunk came once: the /ws bytes equal the payloads' sizes.
    const wsBlocks = new Set(during.chunks.map((c) => c.block));
    assert.equal(during.chunkBytes, chain.bytes(wsBlocks), 'chunk bytes received != payload bytes of those blocks');
    const all = wire.since(0);
    const n = (await readNode(page)).net;
    console.log(`  after the answer: ${used.size} experts (${mib(chain.bytes(used))}); page got ${mib(all.chunkBytes)} over /ws (${JSON.stringify(Object.fromEntries(Object.entries(all.bytesFrom).map(([k, v]) => [k.slice(0, 8), v])))}), #net from relay ${n.bytesFromRelay}, from peers ${n.bytesFromPeers}; ${mib(chain.bytes(new Set([...chain.startup, ...used])))} of the model's ${mib(chain.whole)}`);
    assert.equal(num(n.bytesFromRelay) + num(n.bytesFromPeers), all.chunkBytes, "#net's bytes from relay + peers != chunk bytes in the /ws frames");
    // The page announced what it holds.
    const held = new Set([...chain.startup, ...used].filter((h) => chain.byHash[h].chain === 'B'));
    for (const h of held) assert.ok(all.have.includes(h), `the page never announced Have for ${chain.byHash[h].name}`);
    // The DAG picture: every block, the held ones and the used experts marked.
    const dag = (await readNode(page)).dag;
    assert.equal(dag.length, chain.total, 'blocks in #dag');
    const dagHeld = dag.filter((g) => truthy(g.held)).map((g) => g.hash);
    assert.deepEqual(sorted(dagHeld), sorted(new Set([...chain.startup, ...used])), '#dag data-held');
    const dagUsed = dag.filter((g) => truthy(g.used)).map((g) => g.hash);
    assert.deepEqual(sorted(dagUsed), sorted(used), '#dag data-used');
    // The page's signed usage report reached the relay and was counted: every
    // expert the answer used shows reported calls (the relay served this key
    // those blocks, so the report is accepted).
    for (const h of used) {
      const name = chain.byHash[h].name;
      await until(`the usage report to count ${name}`, async () => {
        const st = await getJson(`${relay.base}/experts/stats/${name}`);
        return st.reported_calls > 0 ? st : null;
      }, 10_000);
    }
    await shot(page, 'node-answer.png');
  });

  await test(2, 'browser 2 gets expert chunks from browser 1 through the relay, and the relay credits browser 1', async () => {
    assert.ok(b1 && peer1 && answerIds, 'needs test 1');
    const stats0 = await getJson(`${relay.base}/p2p/stats`);
    const served0 = stats0.per_peer?.[peer1]?.bytes_served ?? 0;
    const ctx2 = await browser.newContext({ viewport: VIEWPORT });
    try {
      // Relay forwarding (direct transfer is tests/e2e/direct.mjs's).
      const { page, wire } = await openNode(ctx2, `${relay.base}/?direct=0`);
      const reply = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
      checkAnswer(reply, native, 'browser 2');
      assert.deepEqual(reply.ids, answerIds);
      const w = wire.since(0);
      const fromPeer1 = w.bytesFrom[peer1] ?? 0;
      const peerBytes = Object.entries(w.bytesFrom).filter(([k]) => k !== 'relay').reduce((n, [, v]) => n + v, 0);
      const expertsFrom1 = new Set(w.chunks.filter((c) => c.from === peer1 && used.has(c.block)).map((c) => c.block));
      console.log(`  browser 2 got ${mib(w.chunkBytes)} over /ws: ${mib(fromPeer1)} from browser 1 (${expertsFrom1.size} of ${used.size} experts), ${mib(w.bytesFrom.relay ?? 0)} from the relay's store`);
      assert.ok(expertsFrom1.size > 0, 'no expert chunk came from browser 1');
      const n2 = (await readNode(page)).net;
      assert.ok(num(n2.bytesFromPeers) > 0, `#net data-bytes-from-peers = ${n2.bytesFromPeers}`);
      assert.equal(num(n2.bytesFromPeers), peerBytes, "browser 2's #net bytes from peers != peer chunk bytes in its frames");
      // The relay's counters confirm browser 1 served exactly those bytes.
      const stats1 = await getJson(`${relay.base}/p2p/stats`);
      const served = (stats1.per_peer?.[peer1]?.bytes_served ?? 0) - served0;
      console.log(`  /p2p/stats: browser 1 (${peer1.slice(0, 8)}) served ${served} bytes, ${stats1.per_peer?.[peer1]?.chunks_served} chunks in all`);
      assert.equal(served, fromPeer1, "relay's bytes_served for browser 1 != bytes browser 2 got from it");
      // And browser 1 says so (its counters update as it serves).
      const total1 = stats1.per_peer[peer1].bytes_served;
      const n1 = await until('browser 1 to count its served bytes', async () => {
        const n = (await readNode(b1.page)).net;
        return num(n.bytesServed) >= total1 ? n : null;
      });
      assert.equal(num(n1.bytesServed), total1, "browser 1's #net data-bytes-served != the relay's count");
      assert.equal(num(n1.chunksServed), stats1.per_peer[peer1].chunks_served, "browser 1's #net data-chunks-served");
      const sent = b1.wire.since(0).served.reduce((n, c) => n + c.bytes, 0);
      assert.equal(sent, total1, 'Chunk frames browser 1 sent != bytes the relay credits');
      await shot(page, 'node-peer.png');
    } finally {
      await ctx2.close();
    }
  });

  await test(3, 'browser 1 reloads: no block bytes downloaded, answers from the cache; a corrupted entry is caught and fetched again', async () => {
    assert.ok(b1 && answerIds, 'needs test 1');
    const { page, wire } = b1;
    const held = new Set([...chain.startup, ...used]);
    let mark = wire.mark();
    await page.reload();
    await waitLoaded(page, b1.consoleLines);
    let s = await readNode(page);
    console.log(`  cache: ${JSON.stringify({ ...s.cache, text: s.cache?.text?.slice(0, 120) })}`);
    assert.equal(num(s.cache.entries), held.size, '#cache data-entries after reload');
    assert.equal(num(s.cache.bytes), chain.bytes(held), '#cache data-bytes');
    assert.equal(num(s.summary.verified), chain.total);
    let reply = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
    checkAnswer(reply, native, 'after reload');
    assert.deepEqual(reply.ids, answerIds);
    assert.deepEqual(reply.fetched, [], 'experts fetched after reload');
    let w = wire.since(mark);
    assert.equal(w.rest.length, 0, `REST payload requests after reload: ${w.rest.map((r) => r.path)}`);
    assert.equal(w.chunks.length, 0, `/ws chunks received after reload: ${w.chunks.length}`);
    s = await readNode(page);
    assert.equal(num(s.net.bytesFromRelay), 0, '#net data-bytes-from-relay after reload');
    assert.equal(num(s.net.bytesFromPeers), 0, '#net data-bytes-from-peers after reload');
    await shot(page, 'node-cache.png');

    // Corrupt one expert's cache entry.
    const victim = [...used][0];
    const how = await page.evaluate(corruptIdbEntry, victim);
    console.log(`  corrupted the cache entry of ${chain.byHash[victim].name} (${victim.slice(0, 8)}): ${how}`);
    mark = wire.mark();
    await page.reload();
    await waitLoaded(page, b1.consoleLines);
    reply = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
    checkAnswer(reply, native, 'after corrupting the cache');
    assert.deepEqual(reply.ids, answerIds);
    s = await readNode(page);
    console.log(`  alerts: ${JSON.stringify(s.alerts)}; cache note: ${s.cache.note}`);
    assert.ok(s.alerts.some((a) => a.kind === 'cache-corrupt') || /corrupt/i.test(s.cache.note ?? ''),
      'the corrupt cache entry is not reported (no .alert[data-kind=cache-corrupt], no #cache data-note)');
    w = wire.since(mark);
    assert.deepEqual(sorted(w.blocks), [victim], 'only the corrupted block is downloaded again');
    assert.deepEqual(hashesOf(reply.fetched, chain), new Set([victim]), 'data-experts-fetched after the corrupt entry');
    // The entry was replaced by the verified payload.
    const relayPayload = await get(`${relay.base}/blocks/${victim}/payload`);
    const cached = await until('the refetched entry in IndexedDB', async () => {
      const d = await page.evaluate(idbEntryDigest, victim);
      return d === sha256(relayPayload.body) ? d : null;
    }, 10_000).catch(() => null);
    assert.ok(cached, 'the cache entry was not replaced with the verified payload');
    await shot(page, 'node-cache-corrupt.png');

    // The clear button empties the cache.
    await page.click('#clear-cache');
    await page.waitForSelector('#cache[data-entries="0"]', { timeout: 10_000 });
    const left = await page.evaluate(idbCount);
    assert.equal(left, 0, 'IndexedDB entries left after #clear-cache');
  });

  await test(4, 'a native peer serving corrupt chunks is caught by the relay, and the answer still comes', async () => {
    if (ctx1) await ctx1.close();
    ctx1 = null;
    b1 = null;
    await until('the browser peers to leave', async () => (await getJson(`${relay.base}/p2p/stats`)).peers_online === 0);
    const liar = await startCorruptPeer(relay.base);
    try {
      console.log(`  corrupt peer ${liar.peer.slice(0, 8)} announces ${liar.blocks.length} expert blocks`);
      const stats0 = await getJson(`${relay.base}/p2p/stats`);
      const ctx = await browser.newContext({ viewport: VIEWPORT });
      try {
        const { page, wire } = await openNode(ctx, `${relay.base}/`);
        const reply = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
        checkAnswer(reply, native, 'with a lying peer');
        if (answerIds) assert.deepEqual(reply.ids, answerIds);
        const stats1 = await getJson(`${relay.base}/p2p/stats`);
        const c = stats1.per_peer?.[liar.peer] ?? {};
        const lies = liar.state.lines.filter((l) => l.event === 'served_bad').length;
        console.log(`  the liar sent ${lies} corrupt chunks; /p2p/stats: its bad_chunks ${c.bad_chunks}, bytes_served ${c.bytes_served}; bans ${stats0.bans} -> ${stats1.bans}, bad_chunks ${stats0.bad_chunks} -> ${stats1.bad_chunks}`);
        assert.ok(lies > 0, 'the relay never asked the corrupt peer (nothing was tested)');
        assert.ok(c.bad_chunks > 0, "the relay's counters show no bad chunk from the corrupt peer");
        assert.equal(c.bytes_served ?? 0, 0, 'the relay credited the corrupt peer');
        assert.ok(stats1.bans > stats0.bans, 'the corrupt peer was not banned');
        await until('the corrupt peer to be told it is banned', async () => liar.state.lines.some((l) => l.event === 'error' && l.code === 'banned'), 10_000);
        const w = wire.since(0);
        assert.equal(w.chunks.filter((x) => x.from === liar.peer).length, 0, 'a chunk from the corrupt peer reached the page');
        const s = await readNode(page);
        console.log(`  page: #net bad chunks ${s.net.badChunks}, alerts ${JSON.stringify(s.alerts)}`);
        await shot(page, 'node-corrupt-peer.png');
      } finally {
        await ctx.close();
      }
    } finally {
      await liar.stop();
    }
  });

  await test(5, 'without WebGPU the page answers on the CPU path and says so; stop stops an answer', async () => {
    // Chromium without --enable-unsafe-webgpu: navigator.gpu exists but gives no adapter.
    const noGpu = await chromium.launch({
      executablePath: chromiumPath(),
      headless: true,
      args: CHROMIUM_ARGS.filter((a) => a !== '--enable-unsafe-webgpu'),
    });
    try {
      // (a) A browser without the WebGPU API at all.
      const ctxA = await noGpu.newContext({ viewport: VIEWPORT });
      await ctxA.addInitScript(() => { delete Navigator.prototype.gpu; });
      const a = await openNode(ctxA, `${relay.base}/`);
      assert.equal(await a.page.evaluate(() => 'gpu' in navigator), false, 'navigator.gpu still there');
      let s = await readNode(a.page);
      console.log(`  no WebGPU API: #device ${JSON.stringify(s.device)}; alerts ${JSON.stringify(s.alerts.map((x) => x.kind))}`);
      assert.equal(s.device.webgpu, 'no', '#device data-webgpu');
      assert.equal(s.device.plan, 'cpu', '#device data-plan');
      assert.ok(s.alerts.some((x) => x.kind === 'no-webgpu'), 'no .alert[data-kind=no-webgpu]');
      let reply = await ask(a.page, PROMPT, MAX_TOKENS);
      checkAnswer(reply, native, 'no WebGPU API');
      assert.equal(reply.engine, 'cpu', '#reply data-engine');
      if (answerIds) assert.deepEqual(reply.ids, answerIds);
      await shot(a.page, 'node-cpu.png');
      // Stop: clicked (in the page) as soon as the first token shows; the
      // answer ends "stopped", shorter than the full greedy answer.
      await a.page.evaluate(() => {
        const obs = new MutationObserver(() => {
          const r = document.getElementById('reply');
          if (r?.dataset.state === 'running' && Number(r.dataset.tokens) >= 1) {
            obs.disconnect();
            document.getElementById('stop').click();
          }
        });
        obs.observe(document.body, { subtree: true, attributes: true, childList: true });
      });
      reply = await ask(a.page, PROMPT, MAX_TOKENS);
      console.log(`  stop: ${reply.state} after ${reply.tokens} tokens: ${JSON.stringify(reply.text)}`);
      assert.equal(reply.state, 'stopped', '#reply data-state after #stop');
      const full = answerIds ?? native?.ids;
      if (full) {
        assert.ok(reply.ids.length >= 1 && reply.ids.length < full.length, `stopped answer has ${reply.ids.length} tokens`);
        assert.deepEqual(reply.ids, full.slice(0, reply.ids.length), 'the stopped answer is not a prefix of the full one');
      }
      await ctxA.close();

      // (b) The API without an adapter (Chromium's default here).
      const ctxB = await noGpu.newContext({ viewport: VIEWPORT });
      const b = await openNode(ctxB, `${relay.base}/`);
      assert.equal(await b.page.evaluate(async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())), false, 'this Chromium still has a WebGPU adapter');
      s = await readNode(b.page);
      console.log(`  no adapter: #device ${JSON.stringify(s.device)}; alerts ${JSON.stringify(s.alerts.map((x) => x.kind))}`);
      assert.equal(s.device.plan, 'cpu', '#device data-plan');
      assert.ok(s.alerts.some((x) => x.kind === 'no-webgpu') || /CPU/.test(s.device.text), 'the page does not say it runs on the CPU');
      if (!s.alerts.some((x) => x.kind === 'no-webgpu')) console.log('  NOTE: no no-webgpu alert when WebGPU gives no adapter (only #device says so)');
      reply = await ask(b.page, PROMPT, MAX_TOKENS);
      checkAnswer(reply, native, 'no adapter');
      assert.equal(reply.engine, 'cpu', '#reply data-engine');
      if (answerIds) assert.deepEqual(reply.ids, answerIds);
      await shot(b.page, 'node-cpu-no-adapter.png');
      await ctxB.close();
    } finally {
      await noGpu.close();
    }
  });
  await test(6, 'the page\'s own counts agree with what it holds, after an answer and after a reload', async () => {
    const ctx = await browser.newContext({ viewport: VIEWPORT });
    try {
      const { page } = await openNode(ctx, `${relay.base}/`);
      const reply = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
      assert.equal(reply.state, 'done');
      const u = hashesOf(reply.used, chain);
      const held = new Set([...chain.startup, ...u]);
      const experts = (page) => page.evaluate(() => (document.getElementById('fetch-stats')?.dataset.experts || '').split(',').filter(Boolean));
      const problems = [];
      // The cache panel counts what the answer stored (cache writes may lag a little).
      const c = await until('#cache to count the answer\'s experts', async () => {
        const x = (await readNode(page)).cache;
        return num(x.entries) === held.size ? x : null;
      }, 5_000).catch(async () => (await readNode(page)).cache);
      if (num(c.entries) !== held.size) problems.push(`after an answer #cache says ${c.entries} entries (${c.bytes} bytes); the page holds ${held.size} payloads (${chain.bytes(held)} bytes)`);
      await page.reload();
      await waitLoaded(page);
      const e = await experts(page);
      if (e.length !== u.size) problems.push(`after a reload #fetch-stats data-experts lists ${e.length} experts; ${u.size} are held (from the cache)`);
      const again = await ask(page, PROMPT, MAX_TOKENS, { engine: ENGINE });
      const stats = await page.evaluate(() => document.getElementById('chat-stats')?.textContent ?? '');
      const m = stats.match(/holds (\d+) of (\d+) experts/);
      if (m && Number(m[1]) !== u.size) problems.push(`after a reload the chat says "holds ${m[1]} of ${m[2]} experts"; ${u.size} are held`);
      assert.equal(again.state, 'done');
      assert.deepEqual(problems, [], problems.join('; '));
    } finally {
      await ctx.close();
    }
  });
  await test(7, 'a fresh browser copies words generated in the test, which no training example contained', async () => {
    // Drawn here from the default model's word grammar, kept only if they
    // are in its held-out set (tests/e2e/lib.mjs: the corpus's own rule).
    const words = unseenWords(3, Number(process.env.AIBLOCK_E2E_WORD_SEED || 7));
    const prompt = `Q: copy ${words.join(' ')} A:`;
    const want = await nativeGreedy(prompt, 16);
    const ctx = await browser.newContext({ viewport: VIEWPORT });
    try {
      const { page } = await openNode(ctx, `${relay.base}/`);
      const reply = await ask(page, prompt, 16, { engine: ENGINE });
      console.log(`  ${JSON.stringify(prompt)} -> ${JSON.stringify(reply.text)} ids [${reply.ids}] (native ${JSON.stringify(want?.text)})`);
      assert.equal(reply.state, 'done');
      if (want) assert.deepEqual(reply.ids, want.ids, 'greedy ids differ from the native engine');
      assert.equal(reply.text.trim(), words.join(' '), 'the page did not copy the new words');
      await shot(page, 'node-new-words.png');
    } finally {
      await ctx.close();
    }
  });
  await test(8, "the page's fixed-length decode (bench_decode, WebGPU, EOS ignored) gives the native CPU reference's tokens", async () => {
    // The entry point of the browser decode benchmark (tests/e2e/decode_bench.mjs):
    // every expert fetched and resident, a warm-up and a timed run whose
    // tokens must agree, here checked against the CPU reference.
    const n = Number(process.env.AIBLOCK_E2E_FIXED_TOKENS || 32);
    const want = await nativeGreedy(PROMPT, n, { fixed: true });
    let ctx = null;
    try {
      let page = b1?.page;
      if (!page) {
        ctx = await browser.newContext({ viewport: VIEWPORT });
        page = (await openNode(ctx, `${relay.base}/`)).page;
      }
      const gpu = await page.evaluate(async () => !!(navigator.gpu && await navigator.gpu.requestAdapter()));
      if (!gpu) {
        assert.notEqual(process.env.AIBLOCK_REQUIRE_GPU, '1', 'no WebGPU adapter in this Chromium');
        console.log('  SKIPPED: no WebGPU adapter in this Chromium');
        return;
      }
      const r = JSON.parse(await page.evaluate(([p, k]) => window.wasmBindings.bench_decode(p, k, 'f32', 1), [PROMPT, n]));
      console.log(`  ${n} tokens on ${r.adapter}: [${r.tokens}] (${r.ms_per_token.toFixed(2)} ms/token, ${r.dispatches_per_token} dispatches per token; native CPU [${want?.ids}])`);
      assert.equal(r.tokens.length, n, 'not exactly n tokens');
      assert.equal(r.dispatches_per_token > 0 && r.submissions_per_token > 0, true, 'no engine counters');
      if (want) assert.deepEqual(r.tokens, want.ids, 'fixed-length tokens differ from the native CPU reference');
      // EOS ignored: the answer (test 1's, which stops at EOS) goes on past it.
      const eos = JSON.parse(fs.readFileSync(path.join(modelDir(), 'config.json'), 'utf8')).eos_token_id;
      if (native?.stop === 'Eos') {
        assert.deepEqual(r.tokens.slice(0, native.ids.length + 1), [...native.ids, eos], 'the fixed-length decode does not continue past the answer\'s EOS');
      }
      // Bad input is refused with a reason, and the page stays usable.
      const bad = await page.evaluate(([p]) => window.wasmBindings.bench_decode(p, 4, 'f64', 1).then(() => 'resolved', (e) => String(e.message ?? e)), [PROMPT]);
      assert.match(bad, /unknown weight format/, 'a bad dtype is not refused');
      const long = await page.evaluate(([p]) => window.wasmBindings.bench_decode(p, 100000, 'f32', 1).then(() => 'resolved', (e) => String(e.message ?? e)), [PROMPT]);
      assert.match(long, /do not fit the context/, 'a decode past the context is not refused');
    } finally {
      if (ctx) await ctx.close();
    }
  });
} finally {
  if (ctx1) await ctx1.close().catch(() => {});
  await browser.close();
  await relay.stop();
  if (results.some((x) => !x.ok)) {
    console.log(`--- relay log (${relay.dataDir}) ---\n${relay.log().slice(-4000)}`);
  } else {
    fs.rmSync(relay.dataDir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------- run in the page

/**
 * Flip one byte of the IndexedDB "aiblock" / "payloads" entry of `key` (a
 * block hash, hex), whatever the value's shape (ArrayBuffer, typed array,
 * Blob, or an object holding one). Returns a description.
 */
async function corruptIdbEntry(key) {
  const req = (r) => new Promise((res, rej) => { r.onsuccess = () => res(r.result); r.onerror = () => rej(r.error); });
  const db = await req(indexedDB.open('aiblock'));
  const read = db.transaction('payloads', 'readonly').objectStore('payloads');
  const keys = await req(read.getAllKeys());
  const k = keys.find((x) => x === key || (typeof x === 'string' && x.toLowerCase() === key)) ?? key;
  let v = await req(read.get(k));
  if (v === undefined) throw new Error(`no cache entry ${key}; keys: ${keys.slice(0, 5)}`);
  const flip = async (x) => {
    if (x instanceof Blob) {
      const u = new Uint8Array(await x.arrayBuffer());
      u[u.length >> 1] ^= 1;
      return [new Blob([u], { type: x.type }), 'Blob'];
    }
    if (x instanceof ArrayBuffer) { const u = new Uint8Array(x); u[u.length >> 1] ^= 1; return [x, 'ArrayBuffer']; }
    if (ArrayBuffer.isView(x)) { const u = new Uint8Array(x.buffer, x.byteOffset, x.byteLength); u[u.length >> 1] ^= 1; return [x, x.constructor.name]; }
    return null;
  };
  let shape;
  const top = await flip(v);
  if (top) [v, shape] = top;
  else if (v && typeof v === 'object') {
    for (const f of Object.keys(v)) {
      const r = await flip(v[f]);
      if (r) { [v[f], shape] = r; shape = `{${Object.keys(v).join(', ')}}.${f}: ${shape}`; break; }
    }
  }
  if (!shape) throw new Error(`unknown cache value shape: ${Object.prototype.toString.call(v)} ${JSON.stringify(Object.keys(v ?? {}))}`);
  const st = db.transaction('payloads', 'readwrite').objectStore('payloads');
  await req(st.keyPath ? st.put(v) : st.put(v, k));
  db.close();
  return shape;
}

/** SHA-256 (hex) of the payload bytes of one IndexedDB cache entry, or null. */
async function idbEntryDigest(key) {
  const req = (r) => new Promise((res, rej) => { r.onsuccess = () => res(r.result); r.onerror = () => rej(r.error); });
  const db = await req(indexedDB.open('aiblock'));
  const v = await req(db.transaction('payloads', 'readonly').objectStore('payloads').get(key));
  db.close();
  const bytes = async (x) => {
    if (x instanceof Blob) return new Uint8Array(await x.arrayBuffer());
    if (x instanceof ArrayBuffer) return new Uint8Array(x);
    if (ArrayBuffer.isView(x)) return new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
    return null;
  };
  let b = await bytes(v);
  if (!b && v && typeof v === 'object') {
    for (const f of Object.keys(v)) if ((b = await bytes(v[f]))) break;
  }
  if (!b) return null;
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', b));
  return [...d].map((x) => x.toString(16).padStart(2, '0')).join('');
}

async function idbCount() {
  const req = (r) => new Promise((res, rej) => { r.onsuccess = () => res(r.result); r.onerror = () => rej(r.error); });
  const db = await req(indexedDB.open('aiblock'));
  const n = await req(db.transaction('payloads', 'readonly').objectStore('payloads').count());
  db.close();
  return n;
}

const failed = results.filter((x) => !x.ok);
console.log(`\n${results.length - failed.length} passed, ${failed.length} failed`);
process.exit(failed.length ? 1 : 0);
