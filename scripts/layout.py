"""Check modelfold's layout rules from its source: import cycles, private names, sizes.

    .venv/bin/python scripts/layout.py          # print every violation; exit 1 if there is one

Rules (issue 18): no import cycle between modules (imports inside functions count: a lazy import
that breaks a cycle at run time still ties the two modules together); no import up the layers
(``LAYERS``, likewise counting imports inside functions); no private name (``_x``) imported from
another module; no module over 400 lines; no function over 80 lines. Package ``__init__`` modules
re-export and are left out of the cycle check. Alias modules kept for one release (a docstring
starting with "Alias of") are left out of the cycle and layer checks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "modelfold"
MAX_LINES, MAX_FUNC = 400, 80
SHARED = ("errors", "cache", "device", "checks", "bounds", "report", "cluster", "merge", "runcheck", "calib", "io",
          "datasets", "zoo", "assets", "export", "evaluate")
# Layer of each top-level name under modelfold, low to high: shared rooms < engines < api < front ends.
# "" is the package itself (its __init__ re-exports the api). A module imports from its layer or below.
LAYERS = {**dict.fromkeys(SHARED, 0), "traced": 1, "hf": 1, "api": 2, "": 2, "cli": 3, "demo": 3}


def layer(mod: str) -> int | None:
    return LAYERS.get(mod.split(".")[1] if "." in mod else "")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan() -> tuple[dict[str, set[str]], list[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    for mod, path in sorted(modules.items()):
        text = path.read_text()
        tree = ast.parse(text)
        is_pkg = path.name == "__init__.py"
        alias = (ast.get_docstring(tree) or "").startswith("Alias of")
        n_lines = len(text.splitlines())
        if layer(mod) is None and not alias:
            problems.append(f"layer: {mod} is in no layer (add it to LAYERS)")
        if n_lines > MAX_LINES:
            problems.append(f"size: {mod} has {n_lines} lines (> {MAX_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNC:
                    problems.append(f"size: {mod}.{node.name} is {n} lines (> {MAX_FUNC})")
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.ImportFrom):
                src = resolve(mod, is_pkg, node)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.append((sub, []) if sub in modules else (src, [a.name]))
            elif isinstance(node, ast.Import):
                targets = [(a.name, []) for a in node.names]
            for target, names in targets:
                if not target.startswith("modelfold"):
                    continue
                up = f"layer: {mod} imports {target} from a higher layer"
                if not alias and (layer(target) or 0) > (layer(mod) or 0) and up not in problems:
                    problems.append(up)
                for name in names:
                    if name.startswith("_") and not name.startswith("__") and target != mod:
                        problems.append(f"private: {mod} imports {name} from {target}")
                if target in modules and target != mod and not is_pkg and not alias:
                    if not modules[target].name == "__init__.py":
                        edges[mod].add(target)
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    edges, problems = scan()
    problems += [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    for p in sorted(problems):
        print(p)
    print(f"{len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
