"""The module boundaries (the README's "Layout"), held by parsing the imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "watcher"


def _files(module: str) -> list[Path]:
    """A module's file, or every file of a package (a package is one module of the design)."""
    package = PACKAGE / module
    return sorted(package.glob("*.py")) if package.is_dir() else [PACKAGE / f"{module}.py"]


def imports_of(module: str) -> set[str]:
    names: set[str] = set()
    for path in _files(module):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1 and path.parent != PACKAGE:
                    names.add(f"watcher.{module}.{node.module or ''}")
                elif node.level:
                    names.add("watcher." + (node.module or ""))
                elif node.module:
                    names.add(node.module)
    return names


def modules() -> list[str]:
    files = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    return sorted(files | packages)


def test_domain_imports_the_standard_library_only():
    third_party = {
        n
        for n in imports_of("domain")
        if n.split(".")[0] not in sys.stdlib_module_names and n != "__future__"
    }
    assert third_party == set()


def test_only_the_store_touches_sqlite_utils():
    users = [m for m in modules() if any(n.startswith("sqlite_utils") for n in imports_of(m))]
    assert users == ["store"]


def test_nobody_imports_service_or_cli():
    for m in modules():
        if m in ("service", "cli"):
            continue
        assert not imports_of(m) & {"watcher.service", "watcher.cli"}, m
    assert "watcher.cli" not in imports_of("service")


def test_web3_and_eth_tester_stay_at_the_edge():
    for m in modules():
        names = imports_of(m)
        if any(n.startswith("web3") for n in names):
            assert m == "chain", m
        if any(n.startswith("eth_tester") for n in names):
            assert m == "sandbox", m


def test_the_chain_package_has_no_import_cycle():
    """transport <- failover <- traces <- reader, heads beside: each file imports only those before it."""
    package = PACKAGE / "chain"
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {a.name for a in node.names}
        graph[path.stem] = deps - {"__init__"}
    assert graph, "no chain package"
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        if name in done:
            return
        for dep in graph.get(name, ()):
            visit(dep, (*stack, name))
        done.add(name)

    for name in graph:
        visit(name, ())
