"""A real broker for the MCP end-to-end tests (the just-in-time request flow, the tool-name sets,
terminal safety): started with a config.toml of the test's, ready once it answers a ping over
its socket, initialised, and on the way out stopped, swept for plaintext secrets and removed.

Its vault is reached over the wire with the master password (`wire`), as the person's CLI does;
the agent's side is the real `apm-mcp` shim (tests/mcp_client.py).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from broker.cli.client import BrokerClient

from .conftest import PASSWORD, SWEEP_HITS, Apm, Broker, make_home, register_secret
from .conftest import sweep as sweep_home


def wire(home: Path, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One wire call to the broker of `home`, with the master password."""
    with BrokerClient(f"ipc://{home}/run/broker.sock") as client:
        return client.call_raw(method, params or {}, password=SecretStr(PASSWORD), timeout=30)


def add_api_key(home: Path, name: str, value: str) -> None:
    """An api_key entry `name` holding `value` (registered with the suite's secret sweep)."""
    register_secret(value)
    wire(home, "entry.add", {"type": "api_key", "name": name, "secrets": {"key": {"value": value}}})


@contextlib.contextmanager
def mcp_broker(
    config: str, home: Path | None = None, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Apm, Broker]]:
    """A started, initialised broker of `home` (a new one by default) with `config` as its
    config.toml. On exit: stopped, its home swept for plaintext secrets (asserted: none) and
    removed."""
    home = home if home is not None else make_home()
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_text(config)
    broker = Broker(home, extra_env=extra_env or {})
    apm = Apm(home)
    try:
        broker.start(wait=False)
        broker.wait_ready(30)
        apm.ok("init", "--profile", "interactive")
        yield apm, broker
    finally:
        broker.stop()
        hits = sweep_home(home)
        SWEEP_HITS.extend(hits)
        shutil.rmtree(home, ignore_errors=True)
    assert not hits, f"secrets found in plaintext: {hits[:5]}"
