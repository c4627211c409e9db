#!/usr/bin/env python3
"""Print lockwarden's module import graph and its layer violations.

    python3 scripts/module-graph.py [--edges] [--dot] [--check] [--check-layers]

Reads src/**/*.rs, takes every `super::X`, `crate::a::b` and `self::x` path as an edge from
the file's module to the named module (first two levels: `daemon::state`, `plugin::ffi`, ...),
and prints the edges, the strongly connected components inside the daemon (import cycles) and
the edges that cross layers. The layers: the shared modules at the top of src/ (`text`,
`naming`, `plugin_conf`, `protocol`, ...) import none of `plugin`, `daemon`, `cli`; the plugin
imports neither the daemon nor the CLI; the daemon does not import the plugin or the CLI; the
CLI does not import the plugin or the daemon (docs/architecture.md section 5); inside the
daemon, no module imports one of a higher level (DAEMON_LEVELS below). One more rule:
libvirt's ABI (`abi`, the bindgen output) is named only by `plugin::ffi`, which decodes its
integers into Rust types; any other module importing `abi`, or any plugin module other than
ffi.rs that writes `abi::`, is reported as an ABI leak. Exit status 1 with --check when any
cycle, layer violation or ABI leak is found, with --check-layers when any layer violation or
ABI leak is found (cycles are reported but do not fail).
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


def sources():
    """Every .rs file under src/: (path, its module path, its text without comments)."""
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(dirpath, f)
                yield path, module_of(path), strip_comments(open(path, encoding="utf-8").read())


def test_only():
    """Modules declared `#[cfg(test)] mod x;` (unit-test files such as daemon/core_tests.rs):
    like the tests inside a file, they may import anything."""
    out = set()
    # A file module's children live in its own directory: the same module path either way.
    for _, parent, text in sources():
        for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text):
            out.add(tuple(parent + [m.group(1)]))
    return out


def edges():
    out = set()
    skip = test_only()
    for path, me, text in sources():
        if any(tuple(me[: len(t)]) == t for t in skip):
            continue
        text = cut_tests(text)
        # Expand `use a::{b, c}` one level.
        for m in re.finditer(r"\b(crate|super)((?:::\w+)*)(?:::\{([^}]*)\})?", text):
            head, rest, group = m.group(1), m.group(2), m.group(3)
            parts = [p for p in rest.split("::") if p]
            # A bare `crate`/`super` (`pub(super)`) names nothing, unless it is `super::*`.
            if not parts and not group and not text.startswith("::*", m.end()):
                continue
            if head == "crate":
                base = []
            else:
                base = me[:-1] if not path.endswith("mod.rs") else me[:-1]
                if path.endswith("mod.rs"):
                    base = me[:-1]
            # `super::super::x`: one level up per `super`.
            while head == "super" and parts and parts[0] == "super":
                base, parts = base[:-1], parts[1:]
            targets = [base + parts]
            if group and len(parts) < 2:
                # `use crate::{abi as a, plugin::params}`: each entry's path, without `as x`.
                entries = [re.findall(r"\w+", g.split(" as ")[0]) for g in group.split(",")]
                targets = [base + parts + e for e in entries if e]
            for t in targets:
                t = [x for x in t if x not in ("self",)]
                # `crate::protocol::Request` names an item of the module `protocol`.
                target = "::".join(t[:2])
                if target not in MODULES:
                    target = t[0] if t and t[0] in MODULES else ""
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
# Every module the graph knows (first two levels: `daemon::state`, `holder_record::read`).
MODULES = {
    "::".join(module_of(os.path.join(d, f))[:2])
    for d, _, fs in os.walk(ROOT)
    for f in fs
    if f.endswith(".rs") and not os.path.relpath(d, ROOT).startswith("bin")
} - {""}
# The upper layers; each may import only the shared modules (everything else in TOP).
UPPER = {"plugin", "daemon", "cli"}
# The daemon's levels, bottom up (docs/architecture.md section 5): a module imports only
# modules of its own level or below. A new daemon module must be placed here.
DAEMON_LEVELS = [
    "sys lock pidfd lease lockfile holder beat storage error metrics logging args clocks",
    "owner kill record keeper keptmeta liveness health watchdog ledger limits settings",
    "state",
    "release acquire lost fence heartbeat thaw keepalive recover",
    "route",
    "dispatch conn server reexec pidfile listen signals notify",
]
LEVEL = {m: n for n, line in enumerate(DAEMON_LEVELS) for m in line.split()}


def level_violations(e):
    """Daemon imports that go up a level, and daemon modules no level names."""
    out = []
    for a, b in sorted(e):
        if not (a.startswith("daemon::") and b.startswith("daemon::")):
            continue
        ma, mb = a.split("::")[1], b.split("::")[1]
        for m in (ma, mb):
            if m not in LEVEL:
                out.append(f"daemon::{m} is in no level of DAEMON_LEVELS")
        if ma in LEVEL and mb in LEVEL and LEVEL[mb] > LEVEL[ma]:
            out.append(f"{a} (level {LEVEL[ma] + 1}) -> {b} (level {LEVEL[mb] + 1})")
    return sorted(set(out))


# The one module that may name libvirt's ABI (docs/architecture.md section 5).
ABI_EDGE = "plugin::ffi"


def abi_leaks(e):
    """Modules other than plugin::ffi that import `abi`, and plugin files other than ffi.rs
    that write `abi::` (however it was imported)."""
    out = {f"{a} -> abi" for a, b in e if b == "abi" and a != ABI_EDGE}
    plugin = os.path.join(ROOT, "plugin")
    for dirpath, _, files in os.walk(plugin):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            me = "::".join(module_of(path)[:2])
            if not f.endswith(".rs") or me == ABI_EDGE:
                continue
            text = cut_tests(strip_comments(open(path, encoding="utf-8").read()))
            for n, line in enumerate(text.splitlines(), 1):
                if re.search(r"\babi::", line):
                    rel = os.path.relpath(path, os.path.join(ROOT, ".."))
                    out.add(f"{rel}:{n}: {line.strip()}")
    return sorted(out)


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
    leaks = abi_leaks(e)
    levels = level_violations(e)
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
    print(f"ABI leaks (libvirt's abi named outside {ABI_EDGE}): {len(leaks)}")
    for x in leaks:
        print(f"  {x}")
    print(f"daemon level violations (an import of a higher level): {len(levels)}")
    for x in levels:
        print(f"  {x}")
    if "--check" in sys.argv and (cycles or layer or leaks or levels):
        return 1
    if "--check-layers" in sys.argv and (layer or leaks or levels):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
