"""The package's shape (docs/architecture.md), checked on the source: no import cycle between modules, no import
of another module's private names, no function-level import of msq_hf's own modules, no module over 400 lines.

The checks read the source with ``ast`` (nothing is imported), so a violation names the file and line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "msq_hf"
PACKAGE = "msq_hf"
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    """One ``import``/``from ... import`` of an msq_hf module, as written in ``source``."""

    source: str  # importing module, dotted
    target: str  # imported module, dotted (a package means its __init__)
    names: tuple[str, ...]  # names taken from ``target`` (empty for ``import x``)
    line: int
    top_level: bool  # executed at import time (module body, not a function; TYPE_CHECKING blocks excluded)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str) -> list[Import]:
    """Every msq_hf import in ``source``, with whether it runs at import time."""
    path = MODULES[source]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        found.append(Import(source, alias.name, (), child.lineno, top_level))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(source, path.name == "__init__.py", child)
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    names = tuple(alias.name for alias in child.names)
                    found.append(Import(source, target, names, child.lineno, top_level))
            else:
                visit(child, top_level)

    visit(tree, True)
    return found


ALL_IMPORTS = [imp for name in MODULES for imp in imports_of(name)]


def edges(imp: Import) -> set[str]:
    """Modules an import makes the importer depend on (a submodule taken by ``from pkg import sub`` counts)."""
    targets = {imp.target} if imp.target in MODULES else set()
    for name in imp.names:
        sub = f"{imp.target}.{name}"
        if sub in MODULES:
            targets.add(sub)
    return targets


def graph() -> dict[str, set[str]]:
    # Importing any submodule runs its parent packages' __init__ first, which is Python's package mechanics, not a
    # dependency of the submodule: implicit parent imports are not edges.
    deps: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in ALL_IMPORTS:
        if imp.top_level:
            deps[imp.source] |= edges(imp) - {imp.source}
    return deps


def find_cycle(deps: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(deps):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_the_checker_sees_the_package() -> None:
    assert f"{PACKAGE}.config" in MODULES and f"{PACKAGE}.quant.functional" in MODULES
    # msq_hf/__init__.py imports nothing (lazy public names, see its docstring): look at a module that does
    assert any(imp.source == f"{PACKAGE}.quantize" for imp in ALL_IMPORTS), "msq_hf.quantize's imports were not found"


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_function_level_import_of_package_modules() -> None:
    """Function-level imports hide cycles; they are kept for optional third-party dependencies only."""
    late = [
        f"{MODULES[i.source].relative_to(PACKAGE_DIR.parent)}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if not i.top_level
    ]
    assert not late, "function-level msq_hf imports:\n" + "\n".join(late)


def test_no_private_name_imported_from_another_module() -> None:
    bad = [
        f"{MODULES[i.source].relative_to(PACKAGE_DIR.parent)}:{i.line} takes {name} from {i.target}"
        for i in ALL_IMPORTS
        for name in i.names
        if name.startswith("_") and not name.startswith("__") and i.target != i.source
    ]
    assert not bad, "private names crossing modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (limit {MAX_LINES}): split it along a real seam"


def test_schedule_and_quant_math_stay_low() -> None:
    """The pure layers never import the training machinery, the framework glue or the CLI."""
    deps = graph()
    high = ("training", "integrations", "io", "pipeline", "commands", "report")
    for name, targets in deps.items():
        if name == f"{PACKAGE}.quant" or name.startswith(f"{PACKAGE}.quant."):  # not msq_hf.quantize
            upward = sorted(t for t in targets if t.split(".")[1] in high or t == f"{PACKAGE}.config")
            assert not upward, f"{name} imports {upward}"
