"""The package's layer rules and its freedom from import cycles, as CI checks them.

The rules are the import-linter contracts in pyproject.toml (docs/architecture.md says
what they mean); this test runs them, then looks for any cycle between two modules, counting
every import (function-level and ``TYPE_CHECKING`` ones too), so a new cycle or an upward
import fails here with the offending modules named.
"""

from pathlib import Path

import grimp
from importlinter import api  # configures import-linter (readers, contract types)
from importlinter.application import use_cases

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _ignored_imports() -> set[tuple[str, str]]:
    """The imports the contracts ignore (the same exceptions hold for the cycle check)."""
    out = set()
    for contract in api.read_configuration(str(PYPROJECT))["contracts_options"]:
        for line in contract.get("ignore_imports", []) or []:
            importer, imported = (part.strip() for part in line.split("->"))
            out.add((importer, imported))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_layer_contracts_hold(capsys):
    ok = use_cases.lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)
    assert ok, "import-linter contracts broken (pyproject.toml [tool.importlinter]):\n" + capsys.readouterr().out


def test_no_module_level_import_cycle():
    g = grimp.build_graph("rsna_infer", cache_dir=None)
    ignored = _ignored_imports()
    graph = {m: {d for d in g.find_modules_directly_imported_by(m) if (m, d) not in ignored} for m in g.modules}
    cycles = _cycles(graph)
    detail = "\n".join(
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in cycles
    )
    assert not cycles, f"import cycles:\n{detail}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
