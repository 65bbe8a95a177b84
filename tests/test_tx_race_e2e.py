"""An approved transaction executes at most once, attacked against a real broker process:
N real `apm-mcp` shims of one session commit the same previewed `generate_password` at once,
and N raw wire connections send `tx.approve` for the same held change at once. Exactly one
lands (one receipt, one `tx.commit` audit record, the password rotated once); every other call
gets TRANSACTION_CLOSED.

The interleaving is forced, not timed: the test holds the vault database's write lock (an
external SQLite `BEGIN IMMEDIATE`), so the first call to reach its write waits there until
every other call has answered or passed the gate to its own `tx.commit` record; then it lets
go. (The broker's SQLite busy timeout, 5 s, bounds how long that may take.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.cli.client import BrokerClient
from broker.wire.errors import ApmError

from .conftest import PASSWORD, Apm, Broker, register_secret
from .mcp_client import error_body, shim_client

pytestmark = pytest.mark.slow
N = 4
OLD = "race-e2e-Old-0001"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _commits(home: Path, tx_id: str) -> list[dict[str, Any]]:
    """The `tx.commit` audit records naming `tx_id`."""
    lines = (home / "state" / "audit.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r.get("event") == "tx.commit" and r.get("tx") == tx_id]


@contextlib.contextmanager
def vault_write_held(home: Path) -> Iterator[None]:
    """The vault database's write lock, held by this process until the block ends."""
    db = sqlite3.connect(home / "vault.apm", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


async def race(home: Path, tx_id: str, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the calls at once with the vault's write held until each has answered or written
    its `tx.commit` record (so the first to write waits while the others come through)."""
    with vault_write_held(home):
        tasks = [asyncio.ensure_future(c()) for c in calls]
        deadline = time.monotonic() + 60  # a hang guard, not a timed assertion
        while sum(t.done() for t in tasks) + len(_commits(home, tx_id)) < len(tasks):
            assert time.monotonic() < deadline, "the calls never reached the vault write"
            await asyncio.sleep(0.005)  # polling the audit file, not ordering the calls
    return list(await asyncio.gather(*tasks))


def _delegate(apm: Apm, *args: str) -> str:
    out = json.loads(apm.ok("delegate", "--ttl", "1h", "--json", *args).stdout)
    register_secret(out["token"])
    return str(out["token"])


@pytest.mark.anyio
async def test_concurrent_mcp_commits_of_one_generate_password_rotate_it_once(
    vault: Broker, apm: Apm, home: Path
) -> None:
    register_secret(OLD)
    apm.ok("add", "login", "seed", "--from-stdin", stdin=OLD + "\n")
    token = _delegate(apm, "--scope", "admin")  # admin: the commit returns the generated value
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(shim_client(home, token, "legacy", 60.0))
            for _ in range(N)
        ]
        shown = await clients[0].call_tool("generate_password", {"entry": "seed", "length": 32})
        assert not shown.is_error, shown
        tx_id = str((shown.structured_content or {})["tx_id"])
        commit = {"tx_id": tx_id, "approve": True}
        results = await race(
            home,
            tx_id,
            [lambda c=c: c.call_tool("generate_password", commit) for c in clients],
        )
        status = await clients[0].call_tool("tx_status", {"tx_id": tx_id})
    done = [r.structured_content for r in results if not r.is_error]
    codes = sorted(error_body(r)["code"] for r in results if r.is_error)
    assert len(done) == 1 and done[0] is not None, [error_body(r) for r in results if r.is_error]
    assert codes == ["TRANSACTION_CLOSED"] * (N - 1)
    generated = str(done[0]["generated"])
    register_secret(generated)
    assert apm.ok("get", "seed", "--no-newline").stdout == generated
    versions = json.loads(apm.ok("history", "seed", "--json").stdout)
    rows = versions["versions"] if isinstance(versions, dict) else versions
    assert sorted(v["version"] for v in rows) == [0, 1]  # the old value, once
    assert [r["receipt"] for r in _commits(home, tx_id)] == [done[0]["receipt"]]
    assert (status.structured_content or {})["status"] == "committed"
    mine = json.loads(apm.ok("tx", "ls", "--json").stdout)
    assert [t["status"] for t in mine] == ["committed"]  # no fresh preview was handed out


@pytest.mark.anyio
async def test_concurrent_wire_approvals_of_one_held_change_run_it_once(
    vault: Broker, apm: Apm, home: Path
) -> None:
    token = SecretStr(_delegate(apm, "--scope", "admin", "--approve", "owner"))
    addr = f"ipc://{vault.socket}"
    with BrokerClient(addr, client_name="agent") as c, pytest.raises(ApmError) as held:
        c.call_raw("space.add", {"name": "held"}, token=token)
    assert held.value.code == "APPROVAL_PENDING"
    tx_id = str(held.value.data["tx_id"])

    def approve() -> str:
        with BrokerClient(addr, client_name="owner") as c:
            try:
                c.call_raw("tx.approve", {"tx_id": tx_id}, password=SecretStr(PASSWORD))
            except ApmError as exc:
                return exc.code
        return "OK"

    answers = await race(home, tx_id, [lambda: asyncio.to_thread(approve) for _ in range(N)])
    assert sorted(answers) == ["OK"] + ["TRANSACTION_CLOSED"] * (N - 1), answers
    assert len(_commits(home, tx_id)) == 1
    spaces = {s["name"] for s in json.loads(apm.ok("space", "ls", "--json").stdout)}
    assert "held" in spaces
    txs = {t["tx_id"]: t for t in json.loads(apm.ok("tx", "ls", "--json").stdout)}
    assert (
        txs[tx_id]["status"] == "committed"
        and txs[tx_id]["receipt"] == (_commits(home, tx_id)[0]["receipt"])
    )
