// Direct transfer between browsers (issue 24, "Must show"): headless
// Chromium pages fetch expert blocks from each other over WebRTC data
// channels that the real relay signals, on loopback without STUN.
//
//   node tests/e2e/direct.mjs
//
// 1. browser 2 gets its routed experts from browser 1 directly: no /ws chunk
//    and no REST payload during its answer, its relay_forwarded_bytes
//    unchanged, direct_bytes (from its receipts) equal to the payload bytes,
//    browser 1 credited direct_bytes_served; greedy answers equal.
// 2. failover when the holder goes away mid-transfer (test switch
//    ?test_direct_serve_max=1: it serves one chunk, then closes every
//    channel): the answer is equal and nothing is fetched twice.
// 3. failover when the holder never answers the offer (?test_direct_mute=1):
//    the same, after the open deadline.
// 4. a lying browser (?test_lie_direct=1 flips a bit of every chunk it serves
//    directly) is proven by its signed chunk, banned by the relay, credited
//    nothing, and the receiver still answers.
// 5. a page that sends a forged proof (?test_forge_proof=KEY: a statement
//    naming KEY, signed by itself) is banned; KEY stays online, unbanned.
// Screenshots go to target/e2e/direct-*.png.

import assert from 'node:assert/strict';
import path from 'node:path';
import { chromium } from 'playwright-core';

import {
  CHROMIUM_ARGS, ask, chromiumPath, getJson, listChain, nativeGreedy, numberedTests, outDir, readNode,
  sleep, startRelay, trackWire, until,
} from './lib.mjs';

// Greedy: " dog cat green blue red".
const PROMPT = 'Q: reverse red blue green cat dog A:';
const MAX_TOKENS = 8;
const VIEWPORT = { width: 1280, height: 900 };
// Host candidates as plain addresses (not mDNS names) on this machine.
const ARGS = [...CHROMIUM_ARGS, '--disable-features=WebRtcHideLocalIpsWithMdns'];

const { test, results } = numberedTests();

const num = (v) => Number(v ?? NaN);
const mib = (n) => `${(n / (1024 * 1024)).toFixed(2)} MiB`;


const relay = await startRelay();
const a = await listChain(relay.base, 'A');
const b = await listChain(relay.base, 'B');
const byHash = Object.fromEntries([...a, ...b].map((x) => [x.hash, x]));
const heads = Object.fromEntries(b.filter((x) => x.is_head).map((x) => [x.name, x.hash]));
const bytesOf = (names) => names.reduce((n, x) => n + byHash[heads[x] ?? x].payload_len, 0);
const native = await nativeGreedy(PROMPT, MAX_TOKENS);
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: ARGS });
console.log(`chromium ${browser.version()}; relay ${relay.base}`);

/** A page in its own context (own key, own IndexedDB), loaded and online. */
async function openNode(query = '') {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = await context.newPage();
  const lines = [];
  page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
  const wire = trackWire(page);
  await page.goto(`${relay.base}/${query}`);
  try {
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: 180_000 });
    await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 });
  } catch (e) {
    throw new Error(`${query}: not loaded and online: ${e.message}\n${lines.slice(-20).join('\n')}`);
  }
  const peer = (await readNode(page)).net.peerId;
  return { context, page, wire, lines, peer, close: () => context.close() };
}

async function peerStats(peer) {
  const s = await getJson(`${relay.base}/p2p/stats`);
  return s.per_peer?.[peer] ?? {};
}

/** #net once its counters stop moving (the panel redraws at most every 250 ms). */
async function settledNet(page) {
  let a = (await readNode(page)).net;
  for (let i = 0; i < 50; i++) {
    await sleep(400);
    const b = (await readNode(page)).net;
    if (b.bytesDirect === a.bytesDirect && b.bytesFromPeers === a.bytesFromPeers && b.bytesFromRelay === a.bytesFromRelay) return b;
    a = b;
  }
  return a;
}

/** Ask, and account for every byte of the answer's downloads. */
async function answerAccounted(node, label) {
  const n0 = await settledNet(node.page);
  const mark = node.wire.mark();
  const reply = await ask(node.page, PROMPT, MAX_TOKENS);
  const n1 = await settledNet(node.page);
  const w = node.wire.since(mark);
  const direct = num(n1.bytesDirect) - num(n0.bytesDirect);
  const restPayload = w.events.filter((e) => e.kind === 'http-bytes' && e.payload && /\/payload/.test(e.path)).reduce((n, e) => n + e.bytes, 0);
  const expect = bytesOf(reply.fetched);
  console.log(`  ${label}: ${JSON.stringify(reply.text)}; fetched ${reply.fetched.length} experts (${mib(expect)}): ${mib(direct)} directly, ${mib(w.chunkBytes)} over /ws, ${mib(restPayload)} over REST; fallbacks ${num(n1.directFallbacks) - num(n0.directFallbacks)}`);
  assert.equal(reply.state, 'done', `${label}: the answer did not finish: ${reply.text}`);
  if (native) assert.deepEqual(reply.ids, native.ids, `${label}: greedy ids differ from the native engine's`);
  assert.equal(direct + w.chunkBytes + restPayload, expect, `${label}: bytes received (direct + /ws + REST) != the fetched payloads: something was fetched twice or missed`);
  return { reply, direct, ws: w.chunkBytes, rest: restPayload, expect, fallbacks: num(n1.directFallbacks) - num(n0.directFallbacks), net: n1 };
}

const open = [];
const closeAll = async () => {
  while (open.length) await open.pop().close();
  await until('the browser peers to leave', async () => (await getJson(`${relay.base}/p2p/stats`)).peers_online === 0);
};

try {
  await test(1, 'browser 2 gets its routed experts from browser 1 over a data channel; receipts credit direct_bytes', async () => {
    const b1 = await openNode();
    open.push(b1);
    const r1 = await ask(b1.page, PROMPT, MAX_TOKENS);
    if (native) assert.deepEqual(r1.ids, native.ids);
    // Browser 2 first fetches through the relay (receipts count only from
    // keys the relay delivered chunks to), then reloads with direct transfer.
    const b2 = await openNode('?direct=0');
    open.push(b2);
    const s0 = await peerStats(b2.peer);
    assert.ok(num(s0.relay_forwarded_bytes) > 0, `browser 2 got nothing through the relay first: ${JSON.stringify(s0)}`);
    const served0 = num((await peerStats(b1.peer)).direct_bytes_served ?? 0);
    await b2.page.goto(`${relay.base}/`);
    await b2.page.waitForSelector('#summary[data-phase="done"]', { timeout: 180_000 });
    await b2.page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 });
    const got = await answerAccounted(b2, 'browser 2');
    assert.deepEqual(got.reply.ids, r1.ids, 'browser 2 answers otherwise than browser 1');
    assert.ok(got.reply.fetched.length > 0, 'browser 2 fetched no expert: nothing to prove');
    assert.equal(got.direct, got.expect, 'not every fetched byte came directly');
    assert.equal(got.ws + got.rest, 0, 'bytes came through the relay');
    assert.equal(got.fallbacks, 0);
    const s1 = await until('the receipts to be credited', async () => {
      const s = await peerStats(b2.peer);
      return num(s.direct_bytes ?? 0) - num(s0.direct_bytes ?? 0) >= got.expect ? s : null;
    });
    console.log(`  /p2p/stats browser 2: relay_forwarded_bytes ${s0.relay_forwarded_bytes} -> ${s1.relay_forwarded_bytes}, direct_bytes ${s0.direct_bytes ?? 0} -> ${s1.direct_bytes}`);
    assert.equal(s1.relay_forwarded_bytes, s0.relay_forwarded_bytes, "browser 2's relay_forwarded_bytes changed");
    assert.equal(num(s1.direct_bytes) - num(s0.direct_bytes ?? 0), got.expect, "browser 2's direct_bytes != the payload bytes");
    const served = num((await peerStats(b1.peer)).direct_bytes_served) - served0;
    assert.equal(served, got.expect, "browser 1's direct_bytes_served != the payload bytes");
    const n1 = await until("browser 1's panel to count what it served directly", async () => {
      const n = (await readNode(b1.page)).net;
      return num(n.bytesServedDirect) >= got.expect ? n : null;
    });
    assert.ok(num(n1.bytesServedDirect) >= got.expect);
    await b2.page.screenshot({ path: path.join(outDir(), 'direct-receiver.png'), fullPage: true });
  });

  await test(2, 'failover to relay forwarding when the holder goes away mid-transfer; nothing fetched twice', async () => {
    await closeAll();
    const r = await openNode();
    open.push(r);
    const h = await openNode('?test_direct_serve_max=1');
    open.push(h);
    await ask(h.page, PROMPT, MAX_TOKENS);
    const got = await answerAccounted(r, 'receiver');
    console.log(`  receiver #net: ${got.net.text}`);
    assert.ok(got.reply.fetched.length > 0);
    assert.ok(got.direct > 0, 'no byte came directly before the holder went away');
    assert.ok(got.direct < got.expect, 'every byte came directly: the holder did not go away');
    assert.ok(got.fallbacks > 0, 'no direct fetch fell back');
  });

  await test(3, 'failover to relay forwarding when the holder never answers the offer', async () => {
    await closeAll();
    const r = await openNode();
    open.push(r);
    const m = await openNode('?test_direct_mute=1');
    open.push(m);
    await ask(m.page, PROMPT, MAX_TOKENS);
    const got = await answerAccounted(r, 'receiver');
    assert.ok(got.reply.fetched.length > 0);
    assert.equal(got.direct, 0);
    assert.ok(got.fallbacks > 0, 'no direct fetch fell back');
  });

  await test(4, 'a lying browser is proven by its signed chunk, banned, and credited nothing', async () => {
    await closeAll();
    const liar = await openNode('?test_lie_direct=1');
    open.push(liar);
    await ask(liar.page, PROMPT, MAX_TOKENS);
    const r = await openNode();
    open.push(r);
    const got = await answerAccounted(r, 'receiver');
    const s = await readNode(r.page);
    console.log(`  receiver alerts: ${JSON.stringify(s.alerts)}`);
    assert.ok(num(s.net.proofsSent) >= 1, 'no proof sent');
    assert.ok(s.alerts.some((x) => x.kind === 'peer-lied'), 'the receiver does not say the peer lied');
    assert.equal(got.direct, 0, 'a corrupt chunk was accepted');
    const ls = await peerStats(liar.peer);
    assert.equal(num(ls.direct_bytes_served ?? 0), 0, 'the liar was credited direct bytes');
    const banned = await until('the liar to see its ban', async () => {
      const l = await readNode(liar.page);
      return l.alerts.some((x) => x.kind === 'peer-banned') ? l : null;
    });
    assert.ok(banned);
    await r.page.screenshot({ path: path.join(outDir(), 'direct-liar.png'), fullPage: true });
  });

  await test(5, 'a forged proof bans its sender, not the accused', async () => {
    await closeAll();
    const honest = await openNode();
    open.push(honest);
    await ask(honest.page, PROMPT, MAX_TOKENS);
    // The forger accuses the honest page as soon as it holds a block (at
    // load), so it is banned before it is ever online: no openNode().
    const context = await browser.newContext({ viewport: VIEWPORT });
    const forger = { page: await context.newPage(), close: () => context.close() };
    open.push(forger);
    await forger.page.goto(`${relay.base}/?test_forge_proof=${honest.peer}`);
    const f = await until('the forger to see its ban', async () => {
      const n = await readNode(forger.page);
      return n.alerts.some((x) => x.kind === 'peer-banned') ? n : null;
    });
    console.log(`  forger alerts: ${JSON.stringify(f.alerts.map((x) => x.text.slice(0, 160)))}`);
    const h = await readNode(honest.page);
    assert.equal(h.net.state, 'online', 'the accused is not online any more');
    assert.ok(!h.alerts.some((x) => x.kind === 'peer-banned'), 'the accused was banned');
    assert.equal(f.net.state, 'refused', `the forger's node is ${f.net.state}, not refused`);
    // The accused still serves: a fresh page gets blocks from it directly.
    const r = await openNode();
    open.push(r);
    const reply = await ask(r.page, PROMPT, MAX_TOKENS);
    if (native) assert.deepEqual(reply.ids, native.ids);
    const n = (await readNode(r.page)).net;
    assert.ok(num(n.bytesDirect) > 0, 'nothing came directly from the accused');
  });
} finally {
  while (open.length) await open.pop().close().catch(() => {});
  await browser.close();
  await relay.stop();
}
const failed = results.filter((r) => !r.ok);
console.log(`direct: ${results.length - failed.length}/${results.length} passed`);
if (failed.length) {
  console.log(relay.log().split('\n').slice(-40).join('\n'));
  process.exit(1);
}
