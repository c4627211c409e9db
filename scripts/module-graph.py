#!/usr/bin/env python3
"""Print lockwarden's module import graph and its layer violations.

    python3 scripts/module-graph.py [--edges] [--dot] [--check] [--check-layers]

Reads src/**/*.rs, takes every `super::X`, `crate::a::b` and `self::x` path as an edge from
the file's module to the named module (first two levels: `daemon::state`, `plugin::ffi`, ...),
and prints the edges, the strongly connected components inside the daemon (import cycles) and
the edges that cross layers. The layers: the shared modules at the top of src/ (`text`,
`naming`, `plugin_conf`, `protocol`, ...) import none of `plugin`, `daemon`, `cli`; the plugin
imports neither the daemon nor the CLI; the daemon does not import the plugin or the CLI; the
CLI does not import the plugin or the daemon (docs/architecture.md section 5). Exit status 1
with --check when any cycle or layer violation is found, with --check-layers when any layer
violation is found (cycles are reported but do not fail).
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return rel


def strip_comments(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def cut_tests(text):
    # Unit tests may import anything; the layering is about product code.
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


def edges():
    out = set()
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            me = module_of(path)
            text = cut_tests(strip_comments(open(path, encoding="utf-8").read()))
            # Expand `use a::{b, c}` one level.
            for m in re.finditer(r"\b(crate|super)((?:::\w+)+)(?:::\{([^}]*)\})?", text):
                head, rest, group = m.group(1), m.group(2), m.group(3)
                parts = [p for p in rest.split("::") if p]
                if head == "crate":
                    base = []
                else:
                    base = me[:-1] if not path.endswith("mod.rs") else me[:-1]
                    if path.endswith("mod.rs"):
                        base = me[:-1]
                targets = [base + parts]
                if group and len(parts) < 2:
                    targets = [base + parts + [g.strip().split("::")[0]] for g in group.split(",") if g.strip()]
                for t in targets:
                    t = [x for x in t if x not in ("self",)]
                    target = "::".join(t[:2])
                    src = "::".join(me[:2])
                    if target and target != src and target.split("::")[0] in TOP:
                        out.add((src, target))
    return out


# Every top-level module of the library: src/<name>.rs and src/<name>/ (src/bin holds the
# binaries, not library modules).
TOP = {
    f[:-3] if f.endswith(".rs") else f
    for f in os.listdir(ROOT)
    if (f.endswith(".rs") and f != "lib.rs") or (os.path.isdir(os.path.join(ROOT, f)) and f != "bin")
}
# The upper layers; each may import only the shared modules (everything else in TOP).
UPPER = {"plugin", "daemon", "cli"}


def crosses(a, b):
    la, lb = a.split("::")[0], b.split("::")[0]
    return la != lb and lb in UPPER


def sccs(nodes, adj):
    index, low, stack, on, res, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                res.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return res


def main():
    e = edges()
    daemon = {(a, b) for a, b in e if a.startswith("daemon::") and b.startswith("daemon::")}
    adj = {}
    for a, b in daemon:
        adj.setdefault(a, set()).add(b)
    nodes = {x for ab in daemon for x in ab}
    cycles = sccs(nodes, adj)
    layer = sorted((a, b) for a, b in e if crosses(a, b))
    if "--dot" in sys.argv:
        print("digraph lockwarden {")
        for a, b in sorted(e):
            print(f'  "{a}" -> "{b}";')
        print("}")
        return 0
    if "--edges" in sys.argv:
        for a, b in sorted(e):
            print(f"{a} -> {b}")
    print(f"modules: {len({x for ab in e for x in ab})}, edges: {len(e)}")
    print(f"daemon import cycles (strongly connected components): {len(cycles)}")
    for c in cycles:
        print(f"  {len(c)} modules: {' '.join(m.split('::', 1)[1] for m in c)}")
    print(f"layer violations (an import of plugin, daemon or cli from another module): {len(layer)}")
    for a, b in layer:
        print(f"  {a} -> {b}")
    if "--check" in sys.argv and (cycles or layer):
        return 1
    if "--check-layers" in sys.argv and layer:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
