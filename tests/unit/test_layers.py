"""The import graph goes one way (docs/architecture.md, "layers"): the domain packages
import neither grpc nor Starlette nor the adapters over them, and nothing but the
composition roots and the CLI imports those roots (issue 15)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shoal

ROOT = Path(shoal.__file__).parent

# Where a module lives decides its layer; lower layers may not import higher ones.
DOMAIN = ("shoal.core", "shoal.head", "shoal.scheduler", "shoal.replica", "shoal.store", "shoal.backends")
ADAPTERS = ("shoal.rpc", "shoal.http")
ROOTS = ("shoal.run", "shoal.replica_main", "shoal.ingress_worker", "shoal.cli", "shoal.api")
FRAMEWORKS = ("grpc", "starlette", "uvicorn", "h11", "prometheus_client")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {_module(p): _imports(p) for p in ROOT.rglob("*.py") if "proto" not in p.parts}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, DOMAIN)))
def test_the_domain_imports_no_framework_and_no_adapter(module: str) -> None:
    bad = sorted(i for i in MODULES[module] if _under(i, FRAMEWORKS + ADAPTERS + ROOTS))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, ADAPTERS)))
def test_adapters_do_not_import_the_composition_roots(module: str) -> None:
    bad = sorted(i for i in MODULES[module] if _under(i, ROOTS))
    assert not bad, f"{module} imports {bad}"


def test_the_python_api_does_not_import_the_cli() -> None:
    """The CLI is built on ``shoal.api``; the API must not reach back into the CLI."""
    assert sorted(i for i in MODULES["shoal.api"] if _under(i, ("shoal.cli",))) == []


def test_only_rpc_imports_grpc_and_only_http_imports_starlette() -> None:
    grpc_users = sorted(m for m, imps in MODULES.items() if any(_under(i, ("grpc",)) for i in imps))
    web_users = sorted(
        m for m, imps in MODULES.items() if any(_under(i, ("starlette", "uvicorn")) for i in imps)
    )
    assert [
        m for m in grpc_users if not _under(m, ("shoal.rpc", *ROOTS, "shoal.testing", "shoal.chaos"))
    ] == []
    assert [m for m in web_users if not _under(m, ("shoal.http", *ROOTS))] == []
