"""The package's architecture, read from its source with ``ast``: no import circle, no arrow from a
probe up to the runner, no private module at the top level, no module over 600 lines, no private
name imported from another package, and the flat public API."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "probe"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, level: int, current: str) -> str:
    """The absolute name of a (possibly relative) import in module ``current``."""
    if not level:
        return name
    base = current.split(".") if _is_package(current) else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, *, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every import of ``probe`` modules in
    ``name``; with ``top_level_only`` those run when the module is imported (not inside functions
    or ``if TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    out = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if not top_level_only:
                    visit(child, False)
                continue
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, [], child.lineno) for a in child.names if a.name.split(".")[0] == "probe")
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(child.module or "", child.level, name)
                if target.split(".")[0] != "probe":
                    continue
                names = [a.name for a in child.names]
                subs = [n for n in names if f"{target}.{n}" in MODULES]
                if subs:                                    # `from probe.x import submodule`
                    out.extend((f"{target}.{n}", [], child.lineno) for n in subs)
                rest = [n for n in names if n not in subs]
                if rest:
                    out.append((target, rest, child.lineno))
            visit(child, top)

    visit(tree, True)
    return [(m, names, line) for m, names, line in out if m in MODULES]


def _graph(*, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the ``probe`` modules it imports (inside functions too, unless ``top_level_only``:
    an import deferred into a function still makes the two modules depend on each other)."""
    return {name: {m for m, _, _ in _imports(name, top_level_only=top_level_only) if m != name} for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_chain():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_modules_of_probe_import_one_another_without_a_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_probe_imports_the_runner():
    """Probes sit below the runner: they use ``probe.runtime``, never ``probe.jobs``."""
    arrows = [f"{name}:{line} imports {m}" for name in MODULES if name.startswith("probe.probes.")
              for m, _, line in _imports(name, top_level_only=False) if m == "probe.jobs" or m.startswith("probe.jobs.")]
    assert not arrows, "\n".join(arrows)


def test_no_private_module_at_the_top_level():
    loose = sorted(p.name for p in PACKAGE.glob("_*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, loose


def test_no_module_is_over_600_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _package(name: str) -> str:
    return name if _is_package(name) else name.rsplit(".", 1)[0]


def test_no_private_name_is_imported_from_another_package():
    crossings = []
    for name in MODULES:
        for target, names, line in _imports(name, top_level_only=False):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _package(target) != _package(name):
                crossings.append(f"{name}:{line} takes {', '.join(private)} from {target}")
    assert not crossings, "\n".join(crossings)


def test_the_layout_checks_see_the_arrows_they_forbid(tmp_path):
    """The import reader resolves relative and submodule imports (or the checks above could pass
    by reading nothing)."""
    graph, top = _graph(), _graph(top_level_only=True)
    assert "probe.probes.registry" in graph["probe.probes"]                  # from .registry import ...
    assert "probe.checks" in top["probe.probes.registry"]                   # from probe.checks import ...
    assert top["probe.jobs.runner"] < graph["probe.jobs.runner"]             # imports inside functions
    assert sum(len(v) for v in top.values()) > 100


COMPUTATIONS = ("hessian_spectrum", "empirical_ntk", "ntk_spectrum", "loss_surface", "interpolation_paths",
                "gradient_variance", "saturation", "block_lanczos", "hutchinson_trace")


@pytest.mark.parametrize("name", COMPUTATIONS)
def test_every_computation_is_one_flat_import(name):
    import probe

    assert callable(getattr(probe, name))
    assert name in probe.__all__


def test_user_error_is_a_value_error():
    import probe

    assert issubclass(probe.UserError, ValueError)
    assert issubclass(probe.DataError, ValueError)
