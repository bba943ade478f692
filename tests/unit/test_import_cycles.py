"""No import cycle among the platform's modules (shared/maas and services/), lazy imports included.

Read from the source with ``ast``, so nothing is imported. Importing ``a.b.c`` runs ``a`` and
``a.b`` first, so it depends on those packages too; an import inside a function counts (a cycle
through a lazy import is still a cycle); imports under ``if TYPE_CHECKING:`` do not (they never
run).
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "shared" / "maas", ROOT / "services")


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(package.parent).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(tree: ast.Module, package: str) -> set[str]:
    """Every module name an import statement outside ``if TYPE_CHECKING:`` may load."""
    names: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for imported in imported_names(ast.parse(path.read_text()), package):
            parts = imported.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # A submodule naming its own package is not a cycle: the package is already running.
        graph[name] = {
            d for d in deps & modules.keys() if d != name and not name.startswith(d + ".")
        }
    return graph


def test_lazy_and_relative_imports_count_and_type_only_ones_do_not() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import maas.a\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n"
        "    from maas.typed import T\n"
        "def f():\n"
        "    from maas.lazy import g\n"
    )
    names = imported_names(ast.parse(source), "maas.pkg")
    assert {"maas.a", "maas.pkg.b", "maas.lazy.g"} <= names
    assert not any(name.startswith("maas.typed") for name in names)


def test_no_module_imports_itself_back_through_others() -> None:
    try:
        TopologicalSorter(import_graph()).prepare()
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
