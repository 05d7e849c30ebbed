// Browser benchmark (issue 11): run by scripts/bench-browser.sh, which builds
// what it needs. Prints, in one run:
//   - decode tokens/s in headless Chromium: the WebGPU engine (SwiftShader)
//     and the CPU path (wasm SIMD128, and without SIMD when a second dist is
//     given), beside the native engine (wgpu on lavapipe, and the CPU
//     reference on one thread);
//   - time to first token, cold (fresh profile) and from the cache (reload);
//   - the wasm bundle's size, raw, gzip and brotli;
//   - block bytes downloaded before the first token, beside the whole model.
//
// Env: AIBLOCK_DIST (the SIMD build, default dist/), AIBLOCK_DIST_NOSIMD (a
// build without SIMD; skipped if unset), BENCH_TOKENS (most tokens per
// answer, default 16), BENCH_PROMPTS ('|'-separated), AIBLOCK_REQUIRE_GPU=1
// (fail without a WebGPU adapter), plus lib.mjs's.

import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { chromium } from 'playwright-core';

import { spawnSync } from 'node:child_process';
import {
  CHROMIUM_ARGS, REPO, aiblockBin, ask, chromiumPath, listChain, nativeGreedy, readNode, startRelay, trackWire,
} from './lib.mjs';

// Quantized models measured beside the float one (aiblock quantize on the
// same relay, pages opened with ?model=default-<format>); '' skips them.
const QUANTS = (process.env.BENCH_QUANT ?? 'q8_0,q4_0').split(',').filter(Boolean);

// The default model answers in a few tokens and stops at EOS, so decode
// speed is measured over several prompts (each answered once to warm up:
// experts fetched, shaders compiled; then BENCH_RUNS times measured).
const PROMPTS = (process.env.BENCH_PROMPTS || [
  'Q: reverse red blue green cat dog A:',
  'Q: copy red blue green cat dog A:',
  'Q: reverse sun moon star tree fish A:',
  'Q: copy apple bird tree fish moon A:',
].join('|')).split('|');
const PROMPT = PROMPTS[0];
const N = Number(process.env.BENCH_TOKENS || 16);
const DIST = process.env.AIBLOCK_DIST || path.join(REPO, 'dist');
const DIST_NOSIMD = process.env.AIBLOCK_DIST_NOSIMD || null;
const VIEWPORT = { width: 1280, height: 900 };

const mib = (n) => `${(n / (1024 * 1024)).toFixed(2)} MiB`;
const f1 = (x) => (x == null || Number.isNaN(x) ? 'n/a' : x.toFixed(1));
const log = (s) => console.error(s);

function bundleSizes(dist) {
  const wasm = fs.readdirSync(dist).filter((f) => f.endsWith('.wasm'));
  if (wasm.length !== 1) throw new Error(`${dist}: expected one .wasm, found ${wasm}`);
  const raw = fs.readFileSync(path.join(dist, wasm[0]));
  return {
    file: wasm[0],
    raw: raw.length,
    gzip: zlib.gzipSync(raw, { level: 9 }).length,
    brotli: zlib.brotliCompressSync(raw, {
      params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 11, [zlib.constants.BROTLI_PARAM_SIZE_HINT]: raw.length },
    }).length,
  };
}

async function modelBytes(base) {
  const a = await listChain(base, 'A');
  const b = await listChain(base, 'B');
  return [...a, ...b].filter((x) => x.chain === 'A' || x.is_head).reduce((n, x) => n + x.payload_len, 0);
}

async function open(context, url) {
  const page = await context.newPage();
  const wire = trackWire(page);
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForSelector('#summary[data-phase="done"]', { timeout: 300_000 });
  await page.waitForSelector('#net[data-state="online"]', { timeout: 60_000 }).catch(() => {});
  return { page, wire, loadMs: Date.now() - t0 };
}

/**
 * Decode tokens/s over PROMPTS: each answered once to warm up, then RUNS
 * times timed. Returns the median of the timed answers' rates (short answers:
 * a single stall skews a sum) and their range.
 */
const RUNS = Number(process.env.BENCH_RUNS || 3);
async function decode(page, engine) {
  const rates = [];
  let used = null;
  for (const p of PROMPTS) {
    for (let i = 0; i <= RUNS; i++) {
      const r = await ask(page, p, N, { engine, timeout: 600_000 });
      if (r.state !== 'done') throw new Error(`${engine} answer to ${p} ended ${r.state}: ${r.text}`);
      used = r.engine;
      if (i > 0 && r.decodeTps) rates.push(r.decodeTps);
    }
    log(`  ${engine}: ${JSON.stringify(p)}: ${rates.slice(-RUNS).map(f1).join(', ')} tokens/s`);
  }
  if (used !== engine) throw new Error(`asked for the ${engine} engine, the page used ${used}`);
  rates.sort((a, b) => a - b);
  return rates.length ? { median: rates[rates.length >> 1], min: rates[0], max: rates[rates.length - 1], n: rates.length } : null;
}
const rate = (d) => (d ? `${f1(d.median)} tok/s` : 'n/a');
const spread = (d) => (d ? `median of ${d.n} answers (${f1(d.min)}-${f1(d.max)})` : '');

/** The same over the native engine (greedy_ids, best of 3 runs per prompt). */
async function nativeDecode(device) {
  let n = 0;
  let s = 0;
  for (const p of PROMPTS) {
    const r = await nativeGreedy(p, N, { device, threads: 1, runs: 3 });
    if (!r) return { error: 'greedy_ids not built' };
    const k = r.ids.length - 1;
    if (k > 0 && r.decode_tokens_per_s > 0) {
      n += k;
      s += k / r.decode_tokens_per_s;
    }
  }
  return { decode_tokens_per_s: n > 0 ? n / s : null };
}

const rows = [];
const row = (what, value, note = '') => rows.push([what, value, note]);

const simd = bundleSizes(DIST);
const nosimd = DIST_NOSIMD ? bundleSizes(DIST_NOSIMD) : null;

const relay = await startRelay();
const whole = await modelBytes(relay.base);
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
const browserVersion = browser.version();
log(`chromium ${browserVersion}, relay ${relay.base}, prompts ${JSON.stringify(PROMPTS)}`);
let gpuTps = null;
let cpuTps = null;
let nosimdTps = null;
let cold = null;
let warm = null;
let adapter = null;
const quantRows = [];
try {
  const ctx = await browser.newContext({ viewport: VIEWPORT });
  const { page, wire, loadMs } = await open(ctx, `${relay.base}/`);
  adapter = await page.evaluate(async () => {
    const a = navigator.gpu && await navigator.gpu.requestAdapter();
    return a ? (a.info?.description || a.info?.vendor || 'yes') : null;
  });
  if (!adapter && process.env.AIBLOCK_REQUIRE_GPU === '1') throw new Error('no WebGPU adapter');
  const engine = adapter ? 'gpu' : 'cpu';
  // Cold: a fresh profile, one token (what the first token needs, no more).
  const first = await ask(page, PROMPT, 1, { engine, timeout: 600_000 });
  const w = wire.since(0);
  cold = { engine, loadMs, ttft: first.firstTokenMs, bytes: w.chunkBytes + w.restPayloadBytes, ws: w.chunkBytes, rest: w.restPayloadBytes };
  log(`  cold: page loaded in ${loadMs} ms, first token ${f1(first.firstTokenMs)} ms after the click, ${mib(cold.bytes)} of payloads`);
  if (adapter) gpuTps = await decode(page, 'gpu');
  cpuTps = await decode(page, 'cpu');
  // From the cache: reload the same profile.
  const m = wire.mark();
  const t0 = Date.now();
  await page.reload();
  await page.waitForSelector('#summary[data-phase="done"]', { timeout: 300_000 });
  const reloadMs = Date.now() - t0;
  const again = await ask(page, PROMPT, 1, { engine, timeout: 600_000 });
  const w2 = wire.since(m);
  warm = { loadMs: reloadMs, ttft: again.firstTokenMs, bytes: w2.chunkBytes + w2.restPayloadBytes, cache: (await readNode(page)).cache };
  log(`  cache: reloaded in ${reloadMs} ms, first token ${f1(again.firstTokenMs)} ms, ${warm.bytes} payload bytes downloaded`);
  await ctx.close();
  const source = (await listChain(relay.base, 'A')).find((x) => x.name === 'default')?.hash;
  for (const fmt of QUANTS) {
    const bin = aiblockBin();
    if (!bin) { quantRows.push([fmt, 'aiblock not built', '']); continue; }
    const q = spawnSync(bin, ['quantize', '--relay', relay.base, '--meta-hash', source, '--quant', fmt, '--key', path.join(relay.dataDir, 'operator.key'), '--out', path.join(relay.dataDir, '..', `bench-${fmt}`)], { encoding: 'utf8' });
    if (q.status !== 0) { quantRows.push([fmt, 'quantize failed', q.stderr.split('\n')[0]]); continue; }
    const qctx = await browser.newContext({ viewport: VIEWPORT });
    const o = await open(qctx, `${relay.base}/?model=default-${fmt}`);
    const firstQ = await ask(o.page, PROMPT, 1, { engine, timeout: 600_000 });
    const wq = o.wire.since(0);
    const tps = await decode(o.page, engine);
    quantRows.push([fmt, rate(tps), `${engine} engine; ${spread(tps)}; ${mib(wq.chunkBytes + wq.restPayloadBytes)} of payloads before the first token (${f1(firstQ.firstTokenMs)} ms)`]);
    await qctx.close();
  }
} finally {
  await relay.stop();
}

if (DIST_NOSIMD) {
  const r2 = await startRelay({ dist: DIST_NOSIMD });
  try {
    const ctx = await browser.newContext({ viewport: VIEWPORT });
    const { page } = await open(ctx, `${r2.base}/`);
    nosimdTps = await decode(page, 'cpu');
    await ctx.close();
  } finally {
    await r2.stop();
  }
}
await browser.close();

log('native: greedy_ids on the CPU reference (1 thread) and the wgpu engine (lavapipe)');
const nCpu = await nativeDecode('cpu').catch((e) => ({ error: e.message }));
const nGpu = await nativeDecode('gpu').catch((e) => ({ error: e.message }));

row('decode, browser WebGPU (SwiftShader)', adapter ? rate(gpuTps) : 'no adapter', adapter ? `adapter ${adapter}; ${spread(gpuTps)}` : '');
for (const [fmt, v, note] of quantRows) row(`decode, browser, ${fmt} experts`, v, note);
row('decode, native wgpu (lavapipe)', nGpu?.error ? 'failed' : `${f1(nGpu?.decode_tokens_per_s)} tok/s`, nGpu?.error ? nGpu.error.split('\n')[0].slice(0, 80) : 'greedy_ids --device gpu');
row('decode, browser CPU path, wasm SIMD128', rate(cpuTps), `1 thread; ${spread(cpuTps)}`);
row('decode, browser CPU path, wasm without SIMD', DIST_NOSIMD ? rate(nosimdTps) : 'not built', DIST_NOSIMD ? `1 thread; ${spread(nosimdTps)}` : 'set AIBLOCK_DIST_NOSIMD');
row('decode, native CPU reference', nCpu?.error ? 'failed' : `${f1(nCpu?.decode_tokens_per_s)} tok/s`, '1 thread; greedy_ids, best of 3 per prompt');
row('time to first token, cold', `${f1(cold?.ttft)} ms`, `${cold?.engine} engine, after the click; page load before it ${cold?.loadMs} ms`);
row('time to first token, from the cache', `${f1(warm?.ttft)} ms`, `${cold?.engine} engine, after the click; reload before it ${warm?.loadMs} ms, ${warm?.bytes} payload bytes downloaded`);
row('block bytes before the first token (cold)', mib(cold?.bytes ?? 0), `${(100 * (cold?.bytes ?? 0) / whole).toFixed(0)}% of the model's ${mib(whole)} (/ws ${mib(cold?.ws ?? 0)}, REST ${mib(cold?.rest ?? 0)})`);
row('wasm bundle, SIMD128', `${mib(simd.raw)} raw`, `gzip ${mib(simd.gzip)}, brotli ${mib(simd.brotli)}`);
if (nosimd) row('wasm bundle, no SIMD', `${mib(nosimd.raw)} raw`, `gzip ${mib(nosimd.gzip)}, brotli ${mib(nosimd.brotli)}`);

const w0 = Math.max(...rows.map((r) => r[0].length));
const w1 = Math.max(...rows.map((r) => r[1].length));
console.log(`\nbrowser benchmark: greedy answers to ${PROMPTS.length} prompts (decode: median tokens/s over their answers; time to first token and bytes for ${JSON.stringify(PROMPT)}), headless Chromium ${browserVersion}`);
for (const [a, b, c] of rows) console.log(`  ${a.padEnd(w0)}  ${b.padStart(w1)}  ${c}`);
