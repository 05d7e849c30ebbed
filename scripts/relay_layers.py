#!/usr/bin/env python3
"""The relay's module graph, read from its source: for each file, which
crate modules it names (`use crate::...`, `crate::x::` paths, `super::`).
Prints the graph, then cycles (strongly connected components) between files
and between top-level modules, then imports that go up the layer table
below (the layers the crate doc of relay/src/lib.rs draws). Exits 1 on a
cycle (between files or between top-level modules) or an upward import.

    python3 scripts/relay_layers.py [relay/src] [all|list|check]
"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else 'relay/src'
files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.rs'):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)[:-3]
            parts = rel.split('/')
            if parts[-1] == 'mod': parts = parts[:-1]
            if parts == ['lib'] or parts == ['main']: mod = parts[0]
            else: mod = '::'.join(parts)
            files[mod] = p
mods = set(files)
def strip(src):
    src = re.sub(r'//[^\n]*', '', src)
    # drop #[cfg(test)] mod tests { ... } at end (heuristic: from "#[cfg(test)]\nmod tests" to EOF)
    m = re.search(r'#\[cfg\(test\)\]\s*mod tests', src)
    if m: src = src[:m.start()]
    return src
def resolve(path_parts):
    # longest module prefix
    for i in range(len(path_parts), 0, -1):
        cand = '::'.join(path_parts[:i])
        if cand in mods: return cand
    return None
edges = {m: set() for m in mods}
for m, p in files.items():
    src = strip(open(p).read())
    base = m.split('::') if m not in ('lib', 'main') else []
    # expand use crate::{a, b::c}
    for u in re.finditer(r'\bcrate::\{([^;]*?)\};', src, re.S):
        for item in re.split(r',', u.group(1)):
            item = item.strip().split('::')
            t = resolve([x.strip('{} \n') for x in item if x.strip('{} \n')])
            if t: edges[m].add(t)
    for u in re.finditer(r'\bcrate::((?:[a-z_][a-z0-9_]*::)*[a-z_A-Z][A-Za-z0-9_]*)', src):
        t = resolve(u.group(1).split('::'))
        if t: edges[m].add(t)
    for u in re.finditer(r'\b((?:super::)+)\{([^;]*?)\};', src, re.S):
        n = u.group(1).count('super::')
        for item in u.group(2).split(','):
            item = [x.strip('{} \n') for x in item.strip().split('::') if x.strip('{} \n')]
            t = resolve(base[:len(base)-n] + item) if item else None
            if t: edges[m].add(t)
    for u in re.finditer(r'\b((?:super::)+)((?:[a-z_][a-z0-9_]*::)*[A-Za-z_*][A-Za-z0-9_]*)', src):
        n = u.group(1).count('super::')
        parent = base[:len(base)-n] if m not in files or not p.endswith('mod.rs') else base[:len(base)-n]
        t = resolve(parent + u.group(2).split('::'))
        if t: edges[m].add(t)
    edges[m].discard(m)
def top(x): return x.split('::')[0]
def sccs(g):
    idx, low, st, on, out, c = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)
    def sc(v):
        idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
        for w in g.get(v, ()):
            if w not in idx: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in g:
        if v not in idx: sc(v)
    return out
mode = sys.argv[2] if len(sys.argv) > 2 else 'all'
if mode in ('all', 'list'):  # 'check': the verdicts only
    for m in sorted(edges):
        print(f"{m:24} -> {', '.join(sorted(edges[m]))}")
# file level: ignore edges parent<->child inside same top module? no: report them all, but
# excluding lib/main (re-export hub and binary)
fg = {m: {t for t in e if t not in ('lib', 'main')} for m, e in edges.items() if m not in ('lib', 'main')}
# a module's mod.rs declaring children: declaration isn't a `use`, so not an edge.
file_cycles = sccs(fg)
print("file-level cycles:", file_cycles or "none")
tg = {}
for m, e in fg.items():
    tg.setdefault(top(m), set()).update(top(t) for t in e if top(t) != top(m))
# A feature's runtime and its handlers live in different top-level modules
# (peers / peer_api, chat / chat_api), so the top-level graph has no cycle
# either. The state imports no feature: the runtimes sit above it, and the
# composite AppState (core + runtimes) is assembled in `server`.
top_cycles = sccs(tg)
print("top-level-module cycles:", top_cycles or "none")
if mode == 'all':
    for m in sorted(tg): print(f"  {m:10} -> {', '.join(sorted(tg[m]))}")

# Layers (lower number = lower layer). A file may import only files of a
# lower layer, or of its own layer without a cycle (checked above). `state`
# (the core state) is below every feature, so a feature import in it is an
# upward import.
LAYERS = [
  (0, ['metrics', 'pg', 'auth', 'limits', 'gate', 'compute', 'genesis']),
  (1, ['store', 'store::*', 'usage', 'usage::*', 'http', 'quality', 'backup', 'backup::*']),
  (2, ['chain_index']),
  (3, ['state']),
  (4, ['peers', 'peers::*', 'chat', 'chat::*']),
  (5, ['peer_api', 'peer_api::*', 'chat_api', 'chat_api::*', 'rewards', 'cluster', 'cluster::*', 'server::routes_read', 'server::upload', 'server::health', 'server::static_files', 'server::conn']),
  (6, ['server']),
  (7, ['lib', 'main']),
]
import fnmatch
def layer(m):
    for n, pats in LAYERS:
        for p in pats:
            if fnmatch.fnmatch(m, p) or m == p: return n
    return None
bad = []
for m, e in edges.items():
    lm = layer(m)
    if lm is None: bad.append((m, 'no layer')); continue
    for t in e:
        lt = layer(t)
        if lt is None or lt > lm: bad.append((m, t, lm, lt))
print("upward imports:", bad or "none")
sys.exit(1 if file_cycles or top_cycles or bad else 0)
