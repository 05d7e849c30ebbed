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

/** Hashes of one chain's listing (a JSON array of block infos, or {blocks: [...]}). */
export async function listChain(base, chain) {
  const j = await getJson(`${base}/chain/${chain}/blocks`);
  const arr = Array.isArray(j) ? j : j.blocks;
  if (!Array.isArray(arr)) throw new Error(`unexpected listing of chain ${chain}: ${JSON.stringify(j).slice(0, 200)}`);
  return arr;
}

/**
 * Start `relay serve` on a free port with a fresh data dir (or `dataDir`) and
 * `extraArgs`.
 * Resolves { base, dataDir, stop(), log() } once the REST API answers.
 */
export async function startRelay({ dataDir, extraArgs = [] } = {}) {
  const bin = relayBin();
  const port = await freePort();
  dataDir = dataDir || fs.mkdtempSync(path.join(os.tmpdir(), 'aiblock-e2e-'));
  const dist = process.env.AIBLOCK_DIST || path.join(REPO, 'dist');
  if (!fs.existsSync(path.join(dist, 'index.html'))) {
    throw new Error(`${dist}/index.html missing: run \`trunk build --release --offline\` first`);
  }
  const args = ['serve', '--addr', `127.0.0.1:${port}`, '--data', dataDir, '--web', dist];
  const model = process.env.AIBLOCK_MODEL || path.join(REPO, 'models', 'default');
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
