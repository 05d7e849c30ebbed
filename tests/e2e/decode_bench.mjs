// Fixed-length decode benchmark, browser beside native (issue 21): run by
// scripts/bench-browser.sh (first, before bench.mjs; BENCH_ONLY=decode runs
// only this), or by hand once the relay, greedy_ids and dist/ are built:
//   node tests/e2e/decode_bench.mjs
// In one run, per weight format (f32, f16, q8_0, q4_0): N greedy tokens
// after a fixed prompt, EOS ignored, every expert resident, one warm-up and
// the best of BENCH_ROUNDS timed runs, by the same loop
// (web_node::gpu::bench::bench_decode) in two places:
//   - the page in headless Chromium (WebGPU on SwiftShader):
//     window.wasmBindings.bench_decode(prompt, N, dtype, rounds);
//   - natively on lavapipe: greedy_ids --device gpu --fixed N --dtype ..
// alternating browser and native per format (the machine may be shared).
// Prints one line per format:
//   RESULT browser dtype=f16 layers=4 tokens=N dispatches_per_token=..
//     submissions_per_token=.. ms_per_token=.. native_lavapipe_ms_per_token=..
//     ratio=.. tokens_equal=..
// (ratio = native ms / browser ms: the browser's speed as a share of
// native; tokens_equal: the browser's token ids equal native's), and one
// `RESULT native_lavapipe ...` line per format with native's counters, and
// `RESULT browser_probe ...`: the WebGPU adapter's own cost per dispatch and
// matvec bandwidth without and with workgroup barriers, and the round trip
// of one submission read back with mapAsync (a token's floor; see probe()), and
// per format `RESULT browser_kernels dtype=.. token_ms=.. NAME=ms ...`: where
// a browser token's time goes (see kernelProfile()).
//
// Env: BENCH_KERNELS=0 (no kernel profile), BENCH_DECODE (N, default 64),
// BENCH_DECODE_PROMPT, BENCH_DTYPES
// (default f32,f16,q8_0,q4_0), BENCH_ROUNDS (default 3), BENCH_VARIANTS
// (engine schedules, default fused_attn, the page's; e.g.
// fused_attn,fused,unfused: the others get `engine=..` in their lines),
// AIBLOCK_REQUIRE_GPU=1 (fail without a WebGPU adapter), plus lib.mjs's
// (AIBLOCK_DIST, AIBLOCK_RELAY_BIN, AIBLOCK_GREEDY_IDS_BIN; the native
// adapter: WGPU_ADAPTER_NAME, default llvmpipe).

import fs from 'node:fs';
import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, chromiumPath, nativeGreedy, startRelay } from './lib.mjs';

const N = Number(process.env.BENCH_DECODE || 64);
const PROMPT = process.env.BENCH_DECODE_PROMPT || 'Q: reverse red blue green cat dog A:';
const DTYPES = (process.env.BENCH_DTYPES || 'f32,f16,q8_0,q4_0').split(',').map((s) => s.trim()).filter(Boolean);
const ROUNDS = Number(process.env.BENCH_ROUNDS || 3);
// Engine schedules (as the native gpu_engine bench names them): the page's
// default fused_attn, and optionally fused and unfused beside it.
const VARIANTS = (process.env.BENCH_VARIANTS || 'fused_attn').split(',').map((s) => s.trim()).filter(Boolean);
process.env.WGPU_ADAPTER_NAME ??= 'llvmpipe';

const log = (s) => console.error(s);
const f3 = (x) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(3) : 'n/a');
const f2 = (x) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(2) : 'n/a');
const loadavg = () => fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

/** The page's fixed-length decode (rejects with the page's reason). */
async function browserDecode(page, dtype, variant) {
  const json = await page.evaluate(
    ([p, n, d, r, v]) => window.wasmBindings.bench_decode(p, n, d, r, v),
    [PROMPT, N, dtype, ROUNDS, variant],
  );
  return JSON.parse(json);
}

/**
 * What this WebGPU adapter costs, outside the engine (as the native bench
 * measures lavapipe's): the time per dispatch of a 1x1 kernel, and the
 * bandwidth of a [512 x 128] f32 matvec (the model's expert shape) written
 * two ways: one invocation per row (no barriers) and one workgroup per row
 * with a tree reduction (workgroupBarrier, as the engine's kernels reduce).
 * 100 dispatches in one pass, the best of 3 such passes after a warm-up.
 */
async function probe(page) {
  return page.evaluate(async () => {
    const a = await navigator.gpu.requestAdapter();
    const d = await a.requestDevice();
    const head = `@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;`;
    const kernels = {
      tiny: [1, 1, 1, `${head}
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) { if (g.x == 0u) { y[0] = w[0]; } }`],
      rows: [512, 128, 8, `${head}
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let r = g.x; if (r >= 512u) { return; }
  var s = 0.0; for (var i = 0u; i < 128u; i++) { s += w[i * 512u + r]; } y[r] = s; }`],
      barrier: [512, 128, 512, `${head}
var<workgroup> part: array<f32, 64>;
@compute @workgroup_size(64) fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) l: u32) {
  let r = wg.x; var s = 0.0;
  for (var i = l; i < 128u; i += 64u) { s += w[r * 128u + i]; }
  part[l] = s; workgroupBarrier();
  for (var k = 32u; k > 0u; k >>= 1u) { if (l < k) { part[l] += part[l + k]; } workgroupBarrier(); }
  if (l == 0u) { y[r] = part[0]; } }`],
    };
    const out = {};
    for (const [name, [rows, cols, groups, code]] of Object.entries(kernels)) {
      const pl = d.createComputePipeline({ layout: 'auto', compute: { module: d.createShaderModule({ code }), entryPoint: 'main' } });
      const w = d.createBuffer({ size: rows * cols * 4, usage: GPUBufferUsage.STORAGE });
      const y = d.createBuffer({ size: Math.max(16, rows * 4), usage: GPUBufferUsage.STORAGE });
      const bg = d.createBindGroup({ layout: pl.getBindGroupLayout(0), entries: [{ binding: 0, resource: { buffer: w } }, { binding: 1, resource: { buffer: y } }] });
      const run = async (n) => {
        const e = d.createCommandEncoder();
        const pass = e.beginComputePass();
        pass.setPipeline(pl);
        pass.setBindGroup(0, bg);
        for (let i = 0; i < n; i++) pass.dispatchWorkgroups(groups);
        pass.end();
        d.queue.submit([e.finish()]);
        await d.queue.onSubmittedWorkDone();
      };
      await run(4);
      let s = Infinity;
      for (let k = 0; k < 3; k++) {
        const t = performance.now();
        await run(100);
        s = Math.min(s, (performance.now() - t) / 100 / 1000);
      }
      out[name] = { us: s * 1e6, gbps: (rows * cols * 4) / s / 1e9 };
    }
    // A decoded token's floor: one submission of one tiny dispatch and a
    // 16-byte copy, then mapAsync of the copy (as the engine reads a token
    // back), against the copy alone; the mean of 20 after a warm-up (the
    // fastest trips are far below the mean: the page waits on polling).
    {
      const code = `@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) { if (g.x == 0u) { y[0] = y[0] + 1.0; } }`;
      const pl = d.createComputePipeline({ layout: 'auto', compute: { module: d.createShaderModule({ code }), entryPoint: 'main' } });
      const y = d.createBuffer({ size: 256, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
      const rb = d.createBuffer({ size: 256, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
      const bg = d.createBindGroup({ layout: pl.getBindGroupLayout(0), entries: [{ binding: 0, resource: { buffer: y } }] });
      const trip = async (dispatch) => {
        const e = d.createCommandEncoder();
        if (dispatch) {
          const pass = e.beginComputePass();
          pass.setPipeline(pl);
          pass.setBindGroup(0, bg);
          pass.dispatchWorkgroups(1);
          pass.end();
        }
        e.copyBufferToBuffer(y, 0, rb, 0, 16);
        d.queue.submit([e.finish()]);
        await rb.mapAsync(GPUMapMode.READ);
        rb.unmap();
      };
      for (const [name, dispatch] of [['roundtrip', true], ['roundtrip_copy', false]]) {
        await trip(dispatch);
        const t = performance.now();
        for (let k = 0; k < 20; k++) await trip(dispatch);
        out[name] = { ms: (performance.now() - t) / 20 };
      }
    }
    d.destroy();
    return out;
  });
}

/**
 * Where a decoded token's time goes in the page: record the WebGPU calls of
 * a short bench_decode (the compute passes' pipelines, bind groups and
 * dispatches, by wrapping the prototypes' methods), then replay the last
 * token's dispatches (its one submission) outside the engine: each
 * dispatch 10 times in one pass, and the whole token 5 times, the best of 3
 * after a warm-up, awaiting onSubmittedWorkDone. Returns ms per dispatch
 * summed by pipeline label, the whole token replayed (GPU work only) and the
 * page's own ms/token for the short run (the rest is encoding, submission,
 * readback and the wasm/JS loop).
 */
async function kernelProfile(page, dtype, variant) {
  return page.evaluate(async ([p, d, v]) => {
    const R = { on: false, disp: [], submits: 0, dev: null, queue: null };
    const P = GPUComputePassEncoder.prototype;
    const orig = {
      sp: P.setPipeline, sb: P.setBindGroup, dw: P.dispatchWorkgroups,
      qs: GPUQueue.prototype.submit, ce: GPUDevice.prototype.createCommandEncoder,
    };
    P.setPipeline = function (pl) { this.__p = pl; return orig.sp.call(this, pl); };
    P.setBindGroup = function (i, g, ...rest) {
      (this.__b ??= [])[i] = [g, ...rest.map((r) => (r && r.length !== undefined ? Array.from(r) : r))];
      return orig.sb.call(this, i, g, ...rest);
    };
    P.dispatchWorkgroups = function (x, y = 1, z = 1) {
      if (R.on) R.disp.push({ p: this.__p, b: (this.__b || []).slice(), x, y, z, sub: R.submits });
      return orig.dw.call(this, x, y, z);
    };
    GPUQueue.prototype.submit = function (c) { if (R.on) { R.submits++; R.queue = this; } return orig.qs.call(this, c); };
    GPUDevice.prototype.createCommandEncoder = function (desc) { if (R.on) R.dev = this; return orig.ce.call(this, desc); };
    let run;
    try {
      R.on = true;
      run = JSON.parse(await window.wasmBindings.bench_decode(p, 9, d, 1, v));
    } finally {
      R.on = false;
      P.setPipeline = orig.sp; P.setBindGroup = orig.sb; P.dispatchWorkgroups = orig.dw;
      GPUQueue.prototype.submit = orig.qs; GPUDevice.prototype.createCommandEncoder = orig.ce;
    }
    const last = R.disp[R.disp.length - 1].sub;
    const tok = R.disp.filter((x) => x.sub === last);
    const dev = R.dev;
    const q = R.queue;
    const enc = (list, reps) => {
      const e = dev.createCommandEncoder();
      const pass = e.beginComputePass();
      for (let r = 0; r < reps; r++) {
        for (const x of list) {
          pass.setPipeline(x.p);
          x.b.forEach((b, i) => b && pass.setBindGroup(i, b[0], ...b.slice(1)));
          pass.dispatchWorkgroups(x.x, x.y, x.z);
        }
      }
      pass.end();
      q.submit([e.finish()]);
    };
    const time = async (list, reps) => {
      enc(list, 1);
      await q.onSubmittedWorkDone();
      let best = Infinity;
      for (let k = 0; k < 3; k++) {
        const t = performance.now();
        enc(list, reps);
        await q.onSubmittedWorkDone();
        best = Math.min(best, (performance.now() - t) / reps);
      }
      return best;
    };
    const by = {};
    for (const x of tok) {
      const name = x.p.label || 'unnamed';
      by[name] = (by[name] || 0) + await time([x], 10);
    }
    return { by, token: await time(tok, 5), dispatches: tok.length, ms_per_token: run.ms_per_token };
  }, [PROMPT, dtype, variant]);
}

const load0 = loadavg();
const relay = await startRelay();
const browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
log(`chromium ${browser.version()}, relay ${relay.base}; ${N} tokens after ${JSON.stringify(PROMPT)}, best of ${ROUNDS} after a warm-up; load average ${load0}`);
const rows = [];
let failed = false;
try {
  const page = await (await browser.newContext()).newPage();
  const lines = [];
  page.on('console', (m) => lines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => lines.push(`[pageerror] ${e.message}`));
  await page.goto(`${relay.base}/`);
  await page.waitForSelector('#summary[data-phase="done"]', { timeout: 300_000 });
  await page.waitForFunction(() => typeof window.wasmBindings?.bench_decode === 'function', null, { timeout: 30_000 });
  const adapter = await page.evaluate(async () => {
    const a = navigator.gpu && await navigator.gpu.requestAdapter();
    return a ? (a.info?.description || a.info?.vendor || 'yes') : null;
  });
  if (!adapter) {
    if (process.env.AIBLOCK_REQUIRE_GPU === '1') throw new Error('no WebGPU adapter in this Chromium');
    log('no WebGPU adapter in this Chromium: SKIPPED');
  } else {
    let pr = null;
    try {
      pr = await probe(page);
      log(`  adapter probe: ${pr.tiny.us.toFixed(0)} us per dispatch; [512 x 128] matvec ${pr.rows.gbps.toFixed(2)} GB/s one row per invocation, ${pr.barrier.gbps.toFixed(2)} GB/s one row per workgroup with barriers (${pr.barrier.us.toFixed(0)} us); submit + mapAsync ${f3(pr.roundtrip?.ms)} ms with one dispatch, ${f3(pr.roundtrip_copy?.ms)} ms a copy alone`);
      rows.probe = pr;
    } catch (e) {
      log(`  adapter probe failed: ${e.message.split('\n')[0]}`);
    }
    for (const variant of VARIANTS) for (const dtype of DTYPES) {
      const what = variant === 'fused_attn' ? dtype : `${dtype} ${variant}`;
      let b = null;
      let nat = null;
      try {
        b = await browserDecode(page, dtype, variant);
        log(`  browser ${what} (${adapter}, ${b.adapter}): ${f3(b.ms_per_token)} ms/token, ${f2(b.dispatches_per_token)} dispatches, ${f2(b.submissions_per_token)} submissions per token; prefill ${f2(b.prefill_ms)} ms; ids [${b.tokens}]`);
      } catch (e) {
        failed = true;
        log(`  browser ${what}: FAILED ${e.message.split('\n')[0]}\n${lines.slice(-10).join('\n')}`);
      }
      try {
        nat = await nativeGreedy(PROMPT, N, { device: 'gpu', fixed: true, dtype, variant, runs: ROUNDS });
        if (!nat) throw new Error('greedy_ids not built (cargo build --release -p miner --example greedy_ids)');
        log(`  native  ${what} (${nat.adapter}): ${f3(nat.ms_per_token)} ms/token, ${f2(nat.dispatches_per_token)} dispatches, ${f2(nat.submissions_per_token)} submissions per token; prefill ${f2(nat.prefill_ms)} ms; ids [${nat.ids}]`);
      } catch (e) {
        failed = true;
        log(`  native  ${what}: FAILED ${e.message.split('\n')[0]}`);
      }
      let prof = null;
      if (b && process.env.BENCH_KERNELS !== '0') {
        try {
          prof = await kernelProfile(page, dtype, variant);
          log(`  browser ${what} kernels: token replayed ${f3(prof.token)} ms (${prof.dispatches} dispatches; the short run ${f3(prof.ms_per_token)} ms/token); ${Object.entries(prof.by).map(([k, v]) => `${k} ${f3(v)}`).join(', ')} ms`);
        } catch (e) {
          log(`  browser ${what} kernel profile failed: ${e.message.split('\n')[0]}`);
        }
      }
      rows.push({ dtype, variant, b, nat, prof });
    }
  }
} finally {
  await browser.close();
  await relay.stop();
}

const load1 = loadavg();
console.log(`\nfixed-length decode: ${N} tokens after ${JSON.stringify(PROMPT)}, EOS ignored, every expert resident, best of ${ROUNDS} after a warm-up; load average ${load0} at the start, ${load1} at the end`);
const eng = (v) => (v === 'fused_attn' ? '' : ` engine=${v}`);
for (const { dtype, variant, b, nat } of rows) {
  const layers = b?.layers ?? 'n/a';
  const ratio = b && nat ? nat.ms_per_token / b.ms_per_token : NaN;
  const equal = b && nat ? JSON.stringify(b.tokens) === JSON.stringify(nat.ids) : false;
  console.log(`RESULT browser${eng(variant)} dtype=${dtype} layers=${layers} tokens=${N} dispatches_per_token=${f2(b?.dispatches_per_token)} submissions_per_token=${f2(b?.submissions_per_token)} ms_per_token=${f3(b?.ms_per_token)} native_lavapipe_ms_per_token=${f3(nat?.ms_per_token)} ratio=${f2(ratio)} tokens_equal=${equal}`);
}
for (const { dtype, variant, b, nat } of rows) {
  console.log(`RESULT native_lavapipe${eng(variant)} dtype=${dtype} layers=${b?.layers ?? 'n/a'} tokens=${N} dispatches_per_token=${f2(nat?.dispatches_per_token)} submissions_per_token=${f2(nat?.submissions_per_token)} ms_per_token=${f3(nat?.ms_per_token)}`);
}
for (const { dtype, variant, prof } of rows) {
  if (!prof) continue;
  const parts = Object.entries(prof.by).map(([k, v]) => `${k}=${f3(v)}`).join(' ');
  console.log(`RESULT browser_kernels${eng(variant)} dtype=${dtype} token_replay_ms=${f3(prof.token)} short_run_ms_per_token=${f3(prof.ms_per_token)} dispatches=${prof.dispatches} ${parts}`);
}
if (rows.probe) {
  const p = rows.probe;
  console.log(`RESULT browser_probe dispatch_us=${p.tiny.us.toFixed(0)} matvec_512x128_us=${p.rows.us.toFixed(0)} matvec_512x128_gbps=${p.rows.gbps.toFixed(3)} matvec_512x128_barrier_us=${p.barrier.us.toFixed(0)} matvec_512x128_barrier_gbps=${p.barrier.gbps.toFixed(3)} roundtrip_dispatch_map_ms=${f3(p.roundtrip?.ms)} roundtrip_copy_map_ms=${f3(p.roundtrip_copy?.ms)}`);
}
if (failed) process.exit(1);
