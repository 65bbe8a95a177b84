"""Imports point downward: each layer is imported in a clean interpreter and `sys.modules`
shows what it dragged in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _loaded_after(code: str) -> set[str]:
    """Run `code` in a fresh interpreter and return the module names it loaded."""
    script = f"{code}\nimport json, sys\nsys.stdout.write(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def _offenders(loaded: set[str], forbidden: list[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_the_probe_sees_what_an_import_loads() -> None:
    # guards the other tests against a probe that reports nothing
    loaded = _loaded_after("import broker.server.daemon")
    assert {"broker.core.vault", "zmq", "cryptography", "argon2"} <= loaded


def test_cli_does_not_load_the_broker_core_server_or_crypto() -> None:
    loaded = _loaded_after("import broker.cli.main")
    assert "broker.cli.main" in loaded
    forbidden = ["broker.core", "broker.server", "cryptography", "argon2", "psutil"]
    assert _offenders(loaded, forbidden) == []


def test_wire_protocol_loads_nothing_from_other_layers_and_no_zmq() -> None:
    loaded = _loaded_after("import broker.wire.protocol, broker.wire.errors, broker.wire.entries")
    assert "broker.wire.protocol" in loaded
    forbidden = ["broker.core", "broker.server", "broker.cli", "zmq", "cryptography", "psutil"]
    assert _offenders(loaded, forbidden) == []


def test_shim_loads_no_pydantic_mcp_crypto_or_psutil() -> None:
    loaded = _loaded_after("import shim.main")
    assert "shim.main" in loaded
    forbidden = ["pydantic", "mcp", "cryptography", "argon2", "psutil", "broker.core"]
    assert _offenders(loaded, forbidden) == []


def test_shim_start_leaves_out_the_heavy_stdlib_modules_cold_start_cannot_afford() -> None:
    # asyncio (via zmq.utils.monitor), ssl, logging and dataclasses/inspect were ~35 ms of the
    # shim's ~65 ms of imports; the cold-start target is a quarter of an SDK server's
    loaded = _loaded_after("import shim.main")
    forbidden = ["asyncio", "ssl", "logging", "dataclasses", "inspect", "uuid", "tempfile"]
    assert _offenders(loaded, forbidden) == []


def test_core_imports_neither_server_nor_cli() -> None:
    code = (
        "import importlib, pkgutil, broker.core, broker.core.vault, broker.core.key_cache\n"
        "for m in pkgutil.iter_modules(broker.core.__path__):\n"
        "    importlib.import_module('broker.core.' + m.name)\n"
    )
    loaded = _loaded_after(code)
    assert {"broker.core.vault", "broker.core.key_cache", "broker.core.crypto"} <= loaded
    assert _offenders(loaded, ["broker.server", "broker.cli", "zmq"]) == []


def test_the_broker_never_imports_the_shim() -> None:
    code = (
        "import importlib, pkgutil, broker, broker.server, broker.cli, broker.core, broker.wire\n"
        "for pkg in (broker.server, broker.cli, broker.core, broker.wire):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
    )
    loaded = _loaded_after(code)
    assert {"broker.server.daemon", "broker.server.mcp_host", "broker.cli.main"} <= loaded
    assert _offenders(loaded, ["shim"]) == []


def test_the_relay_contract_is_stdlib_only() -> None:
    loaded = _loaded_after("import broker.wire.relay")
    assert "broker.wire.relay" in loaded
    assert _offenders(loaded, ["pydantic", "zmq", "broker.core", "broker.server", "shim"]) == []


def test_dispatch_and_its_operations_load_neither_zmq_nor_the_mcp_sdk() -> None:
    loaded = _loaded_after(
        "import broker.server.dispatch, broker.server.handlers, broker.server.tool_operations"
    )
    assert {"broker.server.dispatch", "broker.server.peer"} <= loaded
    assert _offenders(loaded, ["zmq", "mcp", "shim"]) == []


# ---------------------------------------------------------------- import cycles among modules

# function-local imports that may close a loop, each with its reason; every other import
# (module level, under TYPE_CHECKING, or inside a function) counts
LAZY_EXEMPT: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, dict[str, int]]:
    """broker module -> {broker module it imports: line}, read from the source (nothing run)."""
    import ast

    files = {_module_name(p): p for p in (ROOT / "broker").rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` names a module; `from mod import name` the module
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name inside c
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_broker_modules() -> None:
    graph = _import_graph()
    for (importer, imported), reason in LAZY_EXEMPT.items():
        assert reason and imported in graph.get(importer, {}), (importer, imported)
        del graph[importer][imported]
    found = [
        [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in comp if b in graph[a]]
        for comp in _cycles(graph)
    ]
    assert found == [], "import cycles: break them, or exempt a lazy import with its reason"


def test_the_cycle_check_finds_a_planted_cycle() -> None:
    """Guards the check above against a graph reader that sees no edges."""
    graph = _import_graph()
    assert "broker.server.operations" in graph["broker.server.dispatch"]
    assert "broker.server.approval" in graph["broker.server.dispatch"]  # function-local counts
    graph["broker.server.operations"]["broker.server.dispatch"] = 1
    assert any("broker.server.dispatch" in c for c in _cycles(graph))
