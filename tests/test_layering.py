"""The import direction of DESIGN.md, checked on the source: kernels/ <- model/ <- pipeline/, no cycles.

Every module of ``kernels``, ``model`` and ``pipeline`` is parsed with ``ast`` (nothing is imported);
both top-level imports and those inside functions count for the layering rules, top-level imports for
the cycle check (a function-level import that closes a cycle is a cycle hidden, so both are reported by
``python tests/test_layering.py``, which prints the counts).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "model", "pipeline")
# package -> what it must never import (DESIGN.md, "Layout and direction of imports")
FORBIDDEN = {"model": ("ray", "pipeline"), "kernels": ("model", "pipeline", "ray")}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (``from a import b`` gives a.b when a/b.py exists, else a)
    line: int
    top_level: bool  # at module level (not inside a function)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(module, a.name, child.lineno, not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, module, path.name == "__init__.py")
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(module, sub if sub in known else base, child.lineno, not in_function))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # never runs: annotations only
            else:
                visit(child, nested)

    visit(tree, False)
    return out


def all_imports() -> list[Import]:
    mods = our_modules()
    known = set(mods)
    return [i for m, p in mods.items() for i in imports_of(m, p, known)]


def _ours(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def layering_violations(imports: list[Import]) -> list[str]:
    bad = []
    for i in imports:
        pkg, top = i.module.split(".")[0], i.target.split(".")[0]
        if top in FORBIDDEN.get(pkg, ()):
            bad.append(f"{i.module}:{i.line} imports {i.target}")
    return bad


def cycles(imports: list[Import], top_level_only: bool = True, known: set[str] | None = None) -> list[list[str]]:
    """Strongly connected components of more than one module in the import graph."""
    known = set(our_modules()) if known is None else known
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in imports:
        if (i.top_level or not top_level_only) and i.target in known and i.target != i.module:
            graph[i.module].add(i.target)
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = i.target.split(".")
            for k in range(1, len(parts)):
                parent = ".".join(parts[:k])
                if parent in known and parent != i.module and not i.module.startswith(parent + "."):
                    graph[i.module].add(parent)
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(comps)


def test_model_and_kernels_import_nothing_above_them():
    bad = layering_violations(all_imports())
    assert not bad, "imports against DESIGN.md's direction:\n" + "\n".join(bad)


def test_no_import_cycles_among_our_modules():
    found = cycles(all_imports(), top_level_only=True)
    assert not found, "import cycles (top-level imports):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_cycle_hidden_by_function_level_imports():
    """An import inside a function that closes a cycle only hides it: the modules still depend on each other."""
    found = cycles(all_imports(), top_level_only=False)
    assert not found, "import cycles through function-level imports:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_violations_and_cycles():
    """The rules fire on a made-up graph (so a passing suite means the tree is clean, not the check blind)."""
    made = [Import("model.a", "ray.train", 3, False), Import("kernels.k", "model.a", 1, True),
            Import("model.a", "model.b", 1, True), Import("model.b", "model.a", 1, False)]
    assert len(layering_violations(made)) == 2
    known = {"model.a", "model.b", "kernels.k"}
    assert cycles(made, top_level_only=True, known=known) == []
    assert cycles(made, top_level_only=False, known=known) == [["model.a", "model.b"]]


def report() -> None:
    imports = all_imports()
    ours = [i for i in imports if _ours(i.target)]
    statements = {(i.module, i.line, i.top_level) for i in imports}  # `from a import b, c` is one statement
    for pkg in PACKAGES:
        mine = [s for s in statements if s[0].split(".")[0] == pkg]
        inner = [s for s in mine if not s[2]]
        share = len(inner) / max(1, len(mine))
        print(f"{pkg}: {len(mine)} import statements, {len(inner)} inside functions ({share:.0%})")
    print(f"modules: {len(our_modules())}")
    print(f"layering violations: {len(layering_violations(imports))}")
    for label, top in (("top-level", True), ("all imports", False)):
        found = cycles(ours, top_level_only=top)
        print(f"cycles ({label}): {len(found)}")
        for c in found:
            print("   ", " <-> ".join(c))


if __name__ == "__main__":
    report()
