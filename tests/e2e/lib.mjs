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
 * Start `relay serve` on a free port with a fresh data dir (or `dataDir`).
 * Resolves { base, dataDir, stop(), log() } once the REST API answers.
 */
export async function startRelay({ dataDir } = {}) {
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
 * that `tamper(url, body)` may return different bytes for a response.
 */
export async function startTamperProxy(upstream, tamper) {
  const server = http.createServer((req, res) => {
    const up = http.request(`${upstream}${req.url}`, { method: req.method, headers: req.headers }, (ur) => {
      const chunks = [];
      ur.on('data', (c) => chunks.push(c));
      ur.on('end', () => {
        let body = Buffer.concat(chunks);
        const t = tamper(req.url, body);
        const headers = { ...ur.headers };
        if (t) {
          body = t;
          delete headers['content-length'];
          delete headers['etag'];
          headers['cache-control'] = 'no-store';
        }
        headers['content-length'] = String(body.length);
        delete headers['transfer-encoding'];
        res.writeHead(ur.statusCode, headers);
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

/** Open the page, wait for the verification summary, return what it shows. */
export async function openAndReport(browser, url) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
  try {
    await page.goto(url);
    try {
      await page.waitForSelector('#summary[data-total]', { timeout: 180_000 });
    } catch (e) {
      const html = await page.content();
      throw new Error(`no #summary on the page: ${e.message}\nconsole:\n${consoleLines.join('\n')}\npage:\n${html.slice(0, 2000)}`);
    }
    return await page.evaluate(() => {
      const s = document.getElementById('summary');
      const rows = [...document.querySelectorAll('tr[data-hash]')].map((tr) => ({
        hash: tr.dataset.hash,
        chain: tr.dataset.chain,
        slot: tr.dataset.slot,
        version: tr.dataset.version,
        status: tr.dataset.status,
        parents: tr.dataset.parents ?? '',
        meta: tr.dataset.meta ?? '',
        result: tr.querySelector('td.result')?.textContent ?? '',
      }));
      return {
        verified: Number(s.dataset.verified),
        failed: Number(s.dataset.failed),
        total: Number(s.dataset.total),
        error: s.dataset.error ?? null,
        text: s.textContent,
        progress: document.getElementById('progress')?.textContent ?? '',
        rows,
      };
    });
  } finally {
    await context.close();
  }
}
