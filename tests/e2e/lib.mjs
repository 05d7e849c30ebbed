// Helpers for the browser tests: start the real relay, a tampering proxy,
// and headless Chromium through playwright-core.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export const CHROMIUM_ARGS = [
  '--enable-unsafe-webgpu',
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
  '--disable-gpu-sandbox',
];

export function chromiumPath() {
  return process.env.AIBLOCK_CHROMIUM || '/usr/bin/chromium';
}

export function relayBin() {
  if (process.env.AIBLOCK_RELAY_BIN) return process.env.AIBLOCK_RELAY_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO, 'target');
  for (const p of [path.join(target, 'debug', 'relay'), path.join(target, 'release', 'relay')]) {
    if (fs.existsSync(p)) return p;
  }
  throw new Error('relay binary not found: build it with `cargo build -p relay` or set AIBLOCK_RELAY_BIN');
}

/** The miner CLI (`aiblock`), for comparing the page's chat with native inference. */
export function aiblockBin() {
  if (process.env.AIBLOCK_MINER_BIN) return process.env.AIBLOCK_MINER_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO, 'target');
  for (const p of [path.join(target, 'debug', 'aiblock'), path.join(target, 'release', 'aiblock')]) {
    if (fs.existsSync(p)) return p;
  }
  return null;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** GET a URL; resolves { status, body: Buffer }. */
export function get(url) {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    }).on('error', reject);
  });
}

export async function getJson(url) {
  const r = await get(url);
  if (r.status !== 200) throw new Error(`GET ${url}: HTTP ${r.status}: ${r.body.toString().slice(0, 300)}`);
  return JSON.parse(r.body.toString());
}

/** One chain's listing, every page (following `Link: <url>; rel="next"`). */
export async function listChain(base, chain) {
  const out = [];
  let url = `${base}/chain/${chain}/blocks`;
  for (let pages = 0; url && pages < 10_000; pages++) {
    const r = await get(url);
    if (r.status !== 200) throw new Error(`GET ${url}: HTTP ${r.status}: ${r.body.toString().slice(0, 300)}`);
    const j = JSON.parse(r.body.toString());
    const arr = Array.isArray(j) ? j : j.blocks;
    if (!Array.isArray(arr)) throw new Error(`unexpected listing of chain ${chain}: ${JSON.stringify(j).slice(0, 200)}`);
    out.push(...arr);
    const next = (r.headers.link || '').split(',').map((p) => p.trim()).find((p) => /rel="next"/.test(p));
    const target = next ? next.slice(next.indexOf('<') + 1, next.indexOf('>')) : null;
    url = target ? new URL(target, base).href : null;
  }
  return out;
}

/**
 * Start `relay serve` on a free port with a fresh data dir (or `dataDir`),
 * serving `dist` (default $AIBLOCK_DIST or dist/), the genesis model `model`
 * (default $AIBLOCK_MODEL or models/default), and `extraArgs`.
 * Resolves { base, dataDir, stop(), log() } once the REST API answers.
 */
export async function startRelay({ dataDir, extraArgs = [], dist = null, model = null } = {}) {
  const bin = relayBin();
  const port = await freePort();
  dataDir = dataDir || fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-e2e-'));
  dist = dist || process.env.AIBLOCK_DIST || path.join(REPO, 'dist');
  if (!fs.existsSync(path.join(dist, 'index.html'))) {
    throw new Error(`${dist}/index.html missing: run \`trunk build --release --offline\` first`);
  }
  const args = ['serve', '--addr', `127.0.0.1:${port}`, '--data', dataDir, '--web', dist];
  model = model || process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
  if (fs.existsSync(path.join(model, 'config.json'))) args.push('--model', model);
  args.push(...extraArgs);
  const logFile = path.join(dataDir, '..', `${path.basename(dataDir)}-relay.log`);
  const out = fs.openSync(logFile, 'a');
  const child = spawn(bin, args, { stdio: ['ignore', out, out], env: { RUST_LOG: 'info', ...process.env } });
  let exited = null;
  child.on('exit', (code, sig) => { exited = { code, sig }; });
  const base = `http://127.0.0.1:${port}`;
  const log = () => fs.readFileSync(logFile, 'utf8');
  // Wait until the REST API answers (a cold start writes the genesis blocks first).
  for (let i = 0; ; i++) {
    if (exited) throw new Error(`relay exited (${JSON.stringify(exited)}) before answering:\n${log()}`);
    try {
      const r = await get(`${base}/chain/A/blocks`);
      if (r.status === 200) break;
    } catch { /* not listening yet */ }
    if (i > 1200) { child.kill('SIGKILL'); throw new Error(`relay did not answer within 120 s:\n${log()}`); }
    await sleep(100);
  }
  const stop = async () => {
    if (exited) return;
    child.kill('SIGTERM');
    for (let i = 0; i < 100 && !exited; i++) await sleep(100);
    if (!exited) child.kill('SIGKILL');
  };
  return { base, port, dataDir, stop, log, args: [bin, ...args].join(' ') };
}

/**
 * An HTTP proxy in front of the relay that passes everything through, except
 * that `tamper(url, body, req)` may return different bytes for a response, or
 * `{ status, body }` to change its status too.
 */
export async function startTamperProxy(upstream, tamper) {
  const server = http.createServer((req, res) => {
    const up = http.request(`${upstream}${req.url}`, { method: req.method, headers: req.headers }, (ur) => {
      const chunks = [];
      ur.on('data', (c) => chunks.push(c));
      ur.on('end', () => {
        let body = Buffer.concat(chunks);
        let status = ur.statusCode;
        let t = tamper(req.url, body, req);
        const headers = { ...ur.headers };
        if (t && !Buffer.isBuffer(t)) {
          status = t.status ?? status;
          t = Buffer.from(t.body);
        }
        if (t) {
          body = t;
          delete headers['content-length'];
          delete headers['etag'];
          headers['cache-control'] = 'no-store';
        }
        headers['content-length'] = String(body.length);
        delete headers['transfer-encoding'];
        res.writeHead(status, headers);
        res.end(body);
      });
    });
    up.on('error', (e) => { res.writeHead(502); res.end(String(e)); });
    req.pipe(up);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return { base: `http://127.0.0.1:${port}`, close: () => new Promise((r) => server.close(r)) };
}

/** The block hash of a payload or chunk-list request, else null. */
export function payloadRequestHash(url) {
  const m = new URL(url).pathname.match(/^\/blocks\/([0-9a-f]{64})\/(payload|chunks)$/);
  return m ? m[1] : null;
}

/** Where the tests write screenshots: $AIBLOCK_E2E_OUT or target/e2e. */
export function outDir() {
  const d = process.env.AIBLOCK_E2E_OUT || path.join(process.env.CARGO_TARGET_DIR || path.join(REPO, 'target'), 'e2e');
  fs.mkdirSync(d, { recursive: true });
  return d;
}

/** What the page shows: summary, fetch counters, one entry per block row. */
export function readPage(page) {
  return page.evaluate(() => {
    const s = document.getElementById('summary');
    const fs = document.getElementById('fetch-stats');
    const rows = [...document.querySelectorAll('tr[data-hash]')].map((tr) => ({
      hash: tr.dataset.hash,
      chain: tr.dataset.chain,
      slot: tr.dataset.slot,
      version: tr.dataset.version,
      status: tr.dataset.status,
      payload: tr.dataset.payload,
      parents: tr.dataset.parents ?? '',
      meta: tr.dataset.meta ?? '',
      address: tr.querySelector('td.addr')?.textContent ?? '',
      result: tr.querySelector('td.result')?.textContent ?? '',
    }));
    const num = (el, k) => (el && el.dataset[k] !== undefined ? Number(el.dataset[k]) : null);
    return {
      verified: Number(s.dataset.verified),
      failed: Number(s.dataset.failed),
      total: Number(s.dataset.total),
      held: num(s, 'held'),
      headerOnly: num(s, 'headerOnly'),
      error: s.dataset.error ?? null,
      text: s.textContent,
      progress: document.getElementById('progress')?.textContent ?? '',
      chat: document.getElementById('chat')?.dataset.state ?? null,
      fetch: fs ? {
        bytes: num(fs, 'bytes'),
        payloadBytes: num(fs, 'payloadBytes'),
        modelBytes: num(fs, 'modelBytes'),
        requests: num(fs, 'requests'),
        experts: (fs.dataset.experts || '').split(',').filter(Boolean),
        text: fs.textContent,
      } : null,
      rows,
    };
  });
}

/**
 * Open the page in a new context and wait until it has verified the headers
 * and fetched the payloads it needs to start. Resolves { page, context,
 * report, payloadHashes (Set of block hashes whose payload or chunk list the
 * page requested), consoleLines }; close the context when done.
 */
export async function openPage(browser, url) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const consoleLines = [];
  const payloadHashes = new Set();
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
  page.on('request', (r) => {
    const h = payloadRequestHash(r.url());
    if (h) payloadHashes.add(h);
  });
  await page.goto(url);
  try {
    await page.waitForSelector('#summary[data-phase="done"]', { timeout: 180_000 });
  } catch (e) {
    const html = await page.content();
    await context.close();
    throw new Error(`no finished #summary on the page: ${e.message}\nconsole:\n${consoleLines.join('\n')}\npage:\n${html.slice(0, 2000)}`);
  }
  return { page, context, report: await readPage(page), payloadHashes, consoleLines };
}

/** Open the page, wait for the verification summary, return what it shows. */
export async function openAndReport(browser, url) {
  const { context, report } = await openPage(browser, url);
  await context.close();
  return report;
}

// ------------------------------------------------------------------ the /ws wire

/** Read a postcard varint (LEB128) at `o`; returns [value, next offset]. */
function varint(buf, o) {
  let v = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    const b = buf[o++];
    if (b === undefined) throw new Error('truncated varint');
    v += (b & 0x7f) * mul;
    if (!(b & 0x80)) return [v, o];
    mul *= 128;
  }
  throw new Error('varint too long');
}

const hex = (buf, o, n = 32) => Buffer.from(buf.subarray(o, o + n)).toString('hex');

/**
 * Decode the parts of a relay -> peer frame (web_node::net::peer::FromRelay,
 * postcard) the tests need: Welcome{peer}, ServeChunk{req, block, index},
 * ChunkData{req, block, index, bytes, from}, ChunkFailed, Error{code}.
 * Variant order: Challenge, Welcome, Error, ServeChunk, ChunkData,
 * ChunkFailed, Compute, BlockAdded.
 */
export function decodeFromRelay(payload) {
  const b = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
  let [tag, o] = varint(b, 0);
  switch (tag) {
    case 1: return { type: 'Welcome', peer: hex(b, o) };
    case 2: {
      let n; [n, o] = varint(b, o);
      return { type: 'Error', code: b.subarray(o, o + n).toString() };
    }
    case 3: {
      let req; [req, o] = varint(b, o);
      const block = hex(b, o); o += 32;
      const [index] = varint(b, o);
      return { type: 'ServeChunk', req, block, index };
    }
    case 4: {
      let req, index, n, src;
      [req, o] = varint(b, o);
      const block = hex(b, o); o += 32;
      [index, o] = varint(b, o);
      [n, o] = varint(b, o);
      o += n;
      [src, o] = varint(b, o);
      const from = src === 1 ? hex(b, o) : 'relay';
      return { type: 'ChunkData', req, block, index, bytes: n, from };
    }
    case 5: {
      let req; [req, o] = varint(b, o);
      return { type: 'ChunkFailed', req, block: hex(b, o) };
    }
    default: return { type: ['Challenge', 'Welcome', 'Error', 'ServeChunk', 'ChunkData', 'ChunkFailed', 'Compute', 'BlockAdded'][tag] ?? `tag${tag}` };
  }
}

/**
 * Decode a peer -> relay frame (ToRelay): Have{add}, GetChunk{block, index},
 * Chunk{req, bytes}. Variant order: Login, Status, Have, GetChunk, Chunk,
 * NoChunk, ComputeResult, ComputeFailed.
 */
export function decodeToRelay(payload) {
  const b = Buffer.isBuffer(payload) ? payload : Buffer.from(payload);
  let [tag, o] = varint(b, 0);
  switch (tag) {
    case 2: {
      let n; [n, o] = varint(b, o);
      const add = [];
      for (let i = 0; i < n; i++, o += 32) add.push(hex(b, o));
      return { type: 'Have', add };
    }
    case 3: {
      let req; [req, o] = varint(b, o);
      const block = hex(b, o); o += 32;
      const [index] = varint(b, o);
      return { type: 'GetChunk', req, block, index };
    }
    case 4: {
      let req, n;
      [req, o] = varint(b, o);
      [n, o] = varint(b, o);
      return { type: 'Chunk', req, bytes: n };
    }
    default: return { type: ['Login', 'Status', 'Have', 'GetChunk', 'Chunk', 'NoChunk', 'ComputeResult', 'ComputeFailed'][tag] ?? `tag${tag}` };
  }
}

/**
 * Record what a page downloads, independently of what it says: REST payload
 * and chunk-list requests, and every /ws frame both ways (decoded). Survives
 * reloads. `mark()` returns a position; `since(mark)` what happened after it.
 */
export function trackWire(page) {
  const events = [];
  page.on('request', (r) => {
    const h = payloadRequestHash(r.url());
    if (h) events.push({ kind: 'rest', hash: h, path: new URL(r.url()).pathname, t: Date.now() });
  });
  // Body bytes of every HTTP response (payloads, listings, the bundle).
  page.on('requestfinished', async (r) => {
    try {
      const s = await r.sizes();
      events.push({ kind: 'http-bytes', path: new URL(r.url()).pathname, bytes: s.responseBodySize, payload: !!payloadRequestHash(r.url()), t: Date.now() });
    } catch { /* page gone */ }
  });
  page.on('websocket', (ws) => {
    events.push({ kind: 'ws-open', url: ws.url() });
    ws.on('framereceived', (f) => {
      if (typeof f.payload === 'string') return;
      try { events.push({ kind: 'in', ...decodeFromRelay(f.payload) }); } catch (e) { events.push({ kind: 'in', type: 'undecodable', error: String(e) }); }
    });
    ws.on('framesent', (f) => {
      if (typeof f.payload === 'string') return;
      try { events.push({ kind: 'out', ...decodeToRelay(f.payload) }); } catch (e) { events.push({ kind: 'out', type: 'undecodable', error: String(e) }); }
    });
    ws.on('close', () => events.push({ kind: 'ws-close' }));
  });
  const since = (m = 0) => {
    const ev = events.slice(m);
    const chunks = ev.filter((e) => e.kind === 'in' && e.type === 'ChunkData');
    const bytesFrom = {};
    for (const c of chunks) bytesFrom[c.from] = (bytesFrom[c.from] || 0) + c.bytes;
    return {
      events: ev,
      rest: ev.filter((e) => e.kind === 'rest'),
      /** Body bytes of REST payload and chunk-list answers. */
      restPayloadBytes: ev.filter((e) => e.kind === 'http-bytes' && e.payload).reduce((n, e) => n + e.bytes, 0),
      chunks,
      chunkBytes: chunks.reduce((n, c) => n + c.bytes, 0),
      bytesFrom,
      served: ev.filter((e) => e.kind === 'out' && e.type === 'Chunk'),
      have: ev.filter((e) => e.kind === 'out' && e.type === 'Have').flatMap((e) => e.add),
      welcome: ev.find((e) => e.kind === 'in' && e.type === 'Welcome')?.peer ?? null,
      /** Blocks whose payload bytes reached the page (REST or /ws). */
      blocks: new Set([...ev.filter((e) => e.kind === 'rest').map((e) => e.hash), ...chunks.map((c) => c.block)]),
    };
  };
  return { mark: () => events.length, since, events };
}

// ------------------------------------------------------------------ the node page

/** Everything the node page shows in data attributes (the page contract). */
export function readNode(page) {
  return page.evaluate(() => {
    const ds = (id) => {
      const el = document.getElementById(id);
      return el ? { ...el.dataset, text: el.textContent } : null;
    };
    const list = (s) => (s || '').split(',').map((x) => x.trim()).filter(Boolean);
    const reply = ds('reply');
    if (reply) {
      reply.ids = list(reply.tokenIds).map(Number);
      reply.used = list(reply.expertsUsed);
      reply.fetched = list(reply.expertsFetched);
    }
    return {
      summary: ds('summary'),
      net: ds('net'),
      cache: ds('cache'),
      device: ds('device'),
      reply,
      alerts: [...document.querySelectorAll('#alerts .alert')].map((a) => ({ kind: a.dataset.kind, text: a.textContent.trim() })),
      dag: [...document.querySelectorAll('#dag svg g[data-hash]')].map((g) => ({ ...g.dataset })),
    };
  });
}

/**
 * Ask a prompt in the page's chat (greedy unless `temperature` is given) and
 * wait until that answer ends. Resolves { ...readNode().reply, trace } where
 * trace is every (state, tokens, text length) the reply went through.
 */
export async function ask(page, prompt, maxTokens, { engine = null, temperature = 0, timeout = 300_000 } = {}) {
  await page.fill('#prompt', prompt);
  await page.fill('#max-tokens', String(maxTokens));
  const setIf = async (sel, v) => {
    if (await page.$(sel)) await page.fill(sel, String(v));
  };
  await setIf('#temperature', temperature);
  await setIf('#top-p', 1);
  if (engine) await page.selectOption('#engine', engine);
  await page.evaluate(() => {
    const trace = [];
    window.__replyTrace = trace;
    const snap = () => {
      const r = document.getElementById('reply');
      if (!r) return;
      const s = { state: r.dataset.state ?? null, tokens: Number(r.dataset.tokens ?? NaN), chars: r.textContent.length };
      const last = trace[trace.length - 1];
      if (!last || last.state !== s.state || last.tokens !== s.tokens || last.chars !== s.chars) trace.push({ ...s, t: performance.now() });
    };
    window.__replyObserver?.disconnect();
    window.__replyObserver = new MutationObserver(snap);
    window.__replyObserver.observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
  });
  await page.evaluate(() => {
    window.__sentAt = null;
    document.getElementById('send')?.addEventListener('click', () => { window.__sentAt = performance.now(); }, { once: true, capture: true });
  });
  await page.click('#send');
  try {
    await page.waitForFunction(() => {
      const tr = window.__replyTrace;
      const i = tr.findIndex((x) => x.state === 'running');
      const r = document.getElementById('reply');
      const end = ['done', 'error', 'stopped'];
      return i >= 0 && r && end.includes(r.dataset.state) && tr.slice(i).some((x) => end.includes(x.state));
    }, null, { timeout, polling: 100 });
  } catch (e) {
    const now = await readNode(page).catch(() => null);
    throw new Error(`no finished answer within ${timeout / 1000} s: ${e.message}\nreply now: ${JSON.stringify(now?.reply)}\nalerts: ${JSON.stringify(now?.alerts)}`);
  }
  const { trace, sentAt } = await page.evaluate(() => ({ trace: window.__replyTrace, sentAt: window.__sentAt }));
  const r = (await readNode(page)).reply;
  // Timings from the trace (page clock, ms): first token after the click,
  // and decode tokens/s from the first token shown to the end.
  const tok = trace.filter((x) => x.tokens > 0);
  const first = tok[0];
  // The moment the last token appeared (a later 'done' repeats its count).
  const last = tok.find((x) => x.tokens === tok[tok.length - 1]?.tokens);
  const firstTokenMs = first && sentAt != null ? first.t - sentAt : null;
  const decodeTokens = first && last ? last.tokens - first.tokens : 0;
  const decodeMs = first && last ? last.t - first.t : 0;
  const decodeTps = decodeTokens > 0 ? decodeTokens / (decodeMs / 1000) : null;
  return { ...r, trace, sentAt, firstTokenMs, decodeTokens, decodeMs, decodeTps };
}

/** A built cargo example of the miner (corrupt_peer, greedy_ids), or null. */
export function exampleBin(name) {
  const env = process.env[`AIBLOCK_${name.toUpperCase()}_BIN`];
  if (env) return env;
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO, 'target');
  for (const p of [path.join(target, 'debug', 'examples', name), path.join(target, 'release', 'examples', name)]) {
    if (fs.existsSync(p)) return p;
  }
  return null;
}

export function modelDir() {
  return process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
}

/**
 * Native greedy decoding (miner example greedy_ids): resolves { ids, text,
 * decode_tokens_per_s, first_token_ms, ... }, or null without the binary.
 */
export function nativeGreedy(prompt, maxTokens, { device = 'cpu', threads = 1, runs = 1, fixed = false, dtype = null, variant = null } = {}) {
  const bin = exampleBin('greedy_ids');
  if (!bin || !fs.existsSync(path.join(modelDir(), 'config.json'))) return Promise.resolve(null);
  const args = ['--model', modelDir(), '--prompt', prompt, '--max-tokens', String(maxTokens), '--device', device, '--runs', String(runs)];
  if (device === 'cpu' && threads) args.push('--threads', String(threads));
  // Fixed length: exactly maxTokens tokens, EOS ignored (on the GPU: the
  // page's bench_decode loop, every expert resident in dtype).
  if (fixed) args.push('--fixed', String(maxTokens));
  if (dtype) args.push('--dtype', dtype);
  if (variant) args.push('--variant', variant);
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { err += d; });
    child.on('exit', (code) => {
      if (code !== 0) reject(new Error(`greedy_ids ${args.join(' ')} exited ${code}: ${err}`));
      else resolve(JSON.parse(out.trim().split('\n').pop()));
    });
  });
}

/**
 * Start the lying native peer (miner example corrupt_peer) on the relay:
 * resolves once it logged in and announced its blocks, with { peer (hex),
 * blocks, lines (its JSON events so far), exited, stop() }.
 */
export async function startCorruptPeer(base, extraArgs = []) {
  const bin = exampleBin('corrupt_peer');
  if (!bin) throw new Error('corrupt_peer not built: cargo build -p miner --example corrupt_peer');
  const child = spawn(bin, ['--relay', base, ...extraArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  const st = { lines: [], exited: null, stderr: '' };
  let buf = '';
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try { st.lines.push(JSON.parse(line)); } catch { st.lines.push({ event: 'text', line }); }
    }
  });
  child.stderr.on('data', (d) => { st.stderr += d; });
  child.on('exit', (code, sig) => { st.exited = { code, sig }; });
  for (let i = 0; ; i++) {
    const ready = st.lines.find((l) => l.event === 'ready');
    if (ready) {
      return {
        peer: ready.peer,
        blocks: ready.blocks,
        state: st,
        stop: async () => {
          if (st.exited) return;
          child.kill('SIGTERM');
          for (let j = 0; j < 50 && !st.exited; j++) await sleep(100);
          if (!st.exited) child.kill('SIGKILL');
        },
      };
    }
    if (st.exited) throw new Error(`corrupt_peer exited ${JSON.stringify(st.exited)}: ${st.stderr}`);
    if (i > 600) { child.kill('SIGKILL'); throw new Error('corrupt_peer did not log in within 60 s'); }
    await sleep(100);
  }
}

export { sleep };

/** Poll `f` (async) until it returns a truthy value or `ms` pass. */
export async function until(what, f, ms = 20_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/**
 * Numbered tests that run on when one fails: `test(n, name, fn)` prints
 * PASS/FAIL with the time; `results` collects { name, ok }. Only the numbers
 * in `only` run when it is not empty (AIBLOCK_E2E_ONLY).
 */
export function numberedTests(only = (process.env.AIBLOCK_E2E_ONLY || '').split(',').filter(Boolean).map(Number)) {
  const results = [];
  async function test(n, name, fn) {
    if (only.length && !only.includes(n)) return;
    const t0 = Date.now();
    try {
      await fn();
      results.push({ name, ok: true });
      console.log(`PASS ${n}. ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    } catch (e) {
      results.push({ name, ok: false });
      console.log(`FAIL ${n}. ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n${e.stack || e}`);
    }
  }
  return { test, results };
}

/**
 * Words of the default model's generated-word grammar (1-3 consonant-vowel
 * syllables, sometimes a closing consonant) that belong to its held-out set,
 * i.e. words no training example contained (the same FNV-1a + SplitMix64
 * rule as web_node::eval::corpus::is_unseen_word), drawn from `seed`.
 */
export function unseenWords(n, seed) {
  const CONS = 'bdfgklmnprstvz';
  const VOWELS = 'aeiou';
  let s = seed >>> 0;
  const rnd = (k) => { // mulberry32
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) % k);
  };
  const out = [];
  while (out.length < n) {
    let w = '';
    const syl = 1 + rnd(3);
    for (let i = 0; i < syl; i++) w += CONS[rnd(CONS.length)] + VOWELS[rnd(VOWELS.length)];
    if (rnd(4) === 0) w += CONS[rnd(CONS.length)];
    if (isUnseenWord(w) && !out.includes(w)) out.push(w);
  }
  return out;
}

/** web_node::eval::corpus::is_unseen_word for generated words. */
export function isUnseenWord(w) {
  const M = (1n << 64n) - 1n;
  let h = 0xcbf29ce484222325n;
  for (const b of Buffer.from(w, 'utf8')) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & M;
  }
  let z = h;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M;
  return ((z ^ (z >> 31n)) % 8n) === 0n;
}
