"""No import cycles between difftrain's modules. Every import counts, at module level or inside a function (a
lazy import is still a dependency: it only moves the failure to run time); only ``if TYPE_CHECKING:`` blocks
(annotations, never executed) are left out. A module's edges are the difftrain modules it names: ``from a.b
import c`` is ``a.b.c`` when that is a module, else ``a.b``."""
import ast
from pathlib import Path

import difftrain

PACKAGE = Path(difftrain.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _type_checking_only(node):
            children = node.orelse
        stack.extend(children)


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package at ``root``: line of the first such import}."""
    mods = _modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else resolves to base
            for name in names:
                target = resolve(name)
                if target is not None and target != mod:
                    edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """The strongly connected components of more than one module (Tarjan): (one concrete cycle, its modules)."""
    index, low, on, stack, comps = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append((_one_cycle(graph, set(comp)), sorted(comp)))
    return comps


def _one_cycle(graph: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def _describe(graph, cycle: list[str], comp: list[str]) -> str:
    hops = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    more = (f"\n    (one of the cycles among {len(comp)} modules: {', '.join(comp)})"
            if len(comp) > len(cycle) - 1 else "")
    return " -> ".join(hops + [cycle[-1]]) + more


def test_cycle_finder_counts_lazy_imports_and_skips_type_checking(tmp_path):
    """The checker itself, on a package written to disk: a function-level import closes a cycle, a relative
    import resolves, an annotation-only import does not count."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "sub/__init__.py": "",
             "a.py": "import os\n\n\ndef f():\n    from pkg.sub import b\n",
             "sub/b.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.c import C\n"
                         "from .. import a\n",
             "c.py": "from pkg.sub.b import thing\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.sub.b": 5}  # the lazy import counts
    assert graph["pkg.sub.b"] == {"pkg.a": 5}  # relative; the TYPE_CHECKING import does not count
    assert graph["pkg.c"] == {"pkg.sub.b": 1}
    assert cycles(graph) == [(["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.a", "pkg.sub.b"])]


def test_no_import_cycles_between_difftrain_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["difftrain.parallelism.pipeline.fill"]  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles (break them by moving what both sides need, not by importing lazily):\n" + \
        "\n".join(_describe(graph, *c) for c in found)
