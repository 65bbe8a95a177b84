"""The audit trail: the hash-chained, MACed log and its verifier (unit), the fail-closed rule
through the in-process dispatcher and MCP host, and `apm audit` / `apm audit verify` against a
real broker whose log file the tests tamper with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mcp.types as mt
import pytest
from mcp import Client

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core.audit import GENESIS, AuditLog, derive_audit_key
from broker.core.sessions import CreateSpec, SessionRecord
from broker.core.vault import Change, Vault
from broker.server.mcp_host import Connection, McpHost
from broker.server.peer import Peer
from broker.server.state import State
from broker.wire.errors import StorageError
from broker.wire.protocol import Response

from .conftest import PASSWORD, SWEEP_HITS, Apm, Broker, make_home, register_secret, sweep
from .mcp_client import error_body
from .twin import broker_state, wire

KEY = bytes(range(32))
SECRET = "audit-Secret-Value-6120"
WRONG_PASSWORD = "not-the-master-password-31"
register_secret(SECRET)
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


OPEN: list[AuditLog] = []


@pytest.fixture(autouse=True)
def _close_logs() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def new_log(tmp_path: Path, n: int = 0, key: bytes | None = KEY) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", clock=Clock())
    log.open()
    OPEN.append(log)
    log.key = key
    for i in range(n):
        log.append("tool", tool="get_entry", entry=f"e{i}", code="OK")
    return log


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def rewrite(log: AuditLog, new: list[bytes]) -> None:
    log.path.write_bytes(b"".join(new))


def problems(log: AuditLog) -> list[str]:
    return [str(f) for f in log.verify()]


def names_record(findings: list[str], seq: int) -> bool:
    return any(re.search(rf"\b{seq}\b", f) for f in findings)


# ---------------------------------------------------------------------- the log itself


def test_each_record_carries_seq_the_previous_lines_hash_and_a_mac(tmp_path: Path) -> None:
    log = new_log(tmp_path, 3)
    docs = [json.loads(raw) for raw in lines(log)]
    assert [d["seq"] for d in docs] == [1, 2, 3]
    assert docs[0]["prev"] == GENESIS
    for before, raw_before, doc in zip(docs, lines(log), docs[1:], strict=False):
        assert doc["prev"] == hashlib.sha256(raw_before.rstrip(b"\n")).hexdigest()
        assert before["seq"] + 1 == doc["seq"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d["mac"]) for d in docs)
    assert docs[0]["ts"] == (T0 + timedelta(seconds=1)).isoformat(timespec="microseconds")
    head = json.loads(log.head_path.read_bytes())
    assert head["seq"] == 3
    assert head["hash"] == hashlib.sha256(lines(log)[-1].rstrip(b"\n")).hexdigest()
    assert os.stat(log.path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("size", [0, 1, 32, 63, 64, 65, 200])
def test_the_precomputed_key_macs_exactly_as_hmac_does(size: int) -> None:
    """Records and checkpoints are MACed from the key's precomputed inner and outer hash
    states (`_Hmac`); it must be HMAC-SHA256 for any key length (over 64 bytes: hashed first)
    and any split of the message into parts, and a new key must never reuse the old states."""
    from broker.core.audit import _Hmac, _hmac_for

    key = bytes(range(256))[:size]
    msg = b'{"event":"tool","seq":1}' * 7
    want = hmac.digest(key, msg, "sha256").hex()
    assert _Hmac(key).hexdigest(msg) == want
    assert _Hmac(key).hexdigest(msg[:5], memoryview(msg)[5:], b"") == want
    assert _hmac_for(key).hexdigest(msg) == want
    other = bytes(reversed(key)) + b"!"
    assert _hmac_for(other).hexdigest(msg) == hmac.digest(other, msg, "sha256").hex() != want


def test_the_checkpoints_fast_seal_writes_the_bytes_the_general_seal_would() -> None:
    """The checkpoint is sealed without the general encoder (it is rewritten after every
    burst); `verify` checks it with the general one, so the bytes must be the same."""
    from broker.core.audit import _seal, _seal_head

    for key in (None, KEY):
        for seq, digest in ((0, GENESIS), (7, hashlib.sha256(b"x").hexdigest()), (10**9, "f" * 64)):
            assert _seal_head(key, seq, digest) == _seal(key, {"seq": seq, "hash": digest})[1]


def test_a_deferred_checkpoint_is_written_once_after_a_burst_and_covers_its_last_record(
    tmp_path: Path,
) -> None:
    queued: list[Callable[[], None]] = []
    log = new_log(tmp_path, 1)
    log.defer = queued.append  # the broker passes its event loop's call_soon
    for i in range(4):
        log.append("tool", tool="get_entry", entry=f"burst{i}", code="OK")
    assert len(queued) == 1  # one checkpoint write for the whole burst
    assert json.loads(log.head_path.read_bytes())["seq"] == 1  # behind: the safe direction
    assert problems(log) == []
    queued.pop()()
    head = json.loads(log.head_path.read_bytes())
    assert head["seq"] == 5
    assert head["hash"] == hashlib.sha256(lines(log)[-1].rstrip(b"\n")).hexdigest()
    assert problems(log) == []
    log.append("tool", tool="get_entry", entry="after", code="OK")
    assert len(queued) == 1  # the next burst schedules again
    log.close()  # closing writes what is pending
    OPEN.remove(log)
    assert json.loads(log.head_path.read_bytes())["seq"] == 6


def test_a_deferred_checkpoint_that_cannot_be_written_refuses_the_next_append(
    tmp_path: Path,
) -> None:
    queued: list[Callable[[], None]] = []
    log = new_log(tmp_path, 1)
    log.defer = queued.append
    log.append("tool", tool="get_entry", entry="x", code="OK")
    assert log._head_fd is not None
    os.close(log._head_fd)  # the checkpoint's descriptor fails from now on
    log._head_fd = os.open(os.devnull, os.O_RDONLY)
    queued.pop()()
    for _ in range(2):  # refused for as long as the checkpoint cannot be written
        with pytest.raises(StorageError):
            log.append("tool", tool="get_entry", entry="refused", code="OK")
    assert b"refused" not in log.path.read_bytes()
    os.close(log._head_fd)
    log._head_fd = None  # writable again: the next append goes through
    log.append("tool", tool="get_entry", entry="accepted", code="OK")
    assert b"accepted" in log.path.read_bytes()
    queued.pop()()
    assert problems(log) == []


def test_a_clean_log_verifies_without_findings(tmp_path: Path) -> None:
    log = new_log(tmp_path, 5)
    assert problems(log) == []


def test_reopening_a_log_resumes_its_chain(tmp_path: Path) -> None:
    log = new_log(tmp_path, 3)
    log.close()
    again = new_log(tmp_path, 2)
    assert [json.loads(r)["seq"] for r in lines(again)] == [1, 2, 3, 4, 5]
    assert problems(again) == []


def test_the_audit_key_is_derived_one_way_from_the_vault_key(tmp_path: Path) -> None:
    dek = bytearray(os.urandom(32))
    key = derive_audit_key(dek)
    assert len(key) == 32 and key != bytes(dek)
    assert derive_audit_key(bytearray(dek)) == key
    assert derive_audit_key(bytearray(os.urandom(32))) != key
    log = new_log(tmp_path, 2, key=key)
    log.key = derive_audit_key(bytearray(os.urandom(32)))  # another vault's key
    assert problems(log)


@pytest.mark.parametrize("field", ["password", "token", "value", "secret", "secrets"])
def test_a_record_refuses_fields_that_could_hold_a_secret(tmp_path: Path, field: str) -> None:
    log = new_log(tmp_path, 1)
    with pytest.raises(ValueError):
        log.append("tool", **{field: "x"})
    assert len(lines(log)) == 1


def test_an_edited_record_is_found_and_named(tmp_path: Path) -> None:
    log = new_log(tmp_path, 6)
    rows = lines(log)
    rows[2] = rows[2].replace(b'"code":"OK"', b'"code":"NO"')
    rewrite(log, rows)
    found = problems(log)
    assert any(f.startswith("record 3:") for f in found), found


def test_an_edited_record_with_a_recomputed_chain_is_still_caught_by_its_mac(
    tmp_path: Path,
) -> None:
    log = new_log(tmp_path, 4)
    docs = [json.loads(r) for r in lines(log)]
    docs[1]["entry"] = "forged"
    prev = GENESIS
    out = []
    for d in docs:  # an attacker without the key re-links every hash, keeps the macs
        d["prev"] = prev
        raw = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(raw).hexdigest()
        out.append(raw + b"\n")
    rewrite(log, out)
    found = problems(log)
    assert any(f.startswith("record 2:") for f in found), found


def test_a_deleted_record_is_found_and_named(tmp_path: Path) -> None:
    log = new_log(tmp_path, 6)
    rows = lines(log)
    del rows[3]  # record 4
    rewrite(log, rows)
    found = problems(log)
    assert found and names_record(found, 4), found


def test_reordered_records_are_found_and_named(tmp_path: Path) -> None:
    log = new_log(tmp_path, 6)
    rows = lines(log)
    rows[1], rows[2] = rows[2], rows[1]
    rewrite(log, rows)
    found = problems(log)
    assert found and names_record(found, 2) and names_record(found, 3), found


@pytest.mark.parametrize("cut", [1, 3])
def test_a_truncated_log_is_found_through_the_checkpoint(tmp_path: Path, cut: int) -> None:
    log = new_log(tmp_path, 6)
    rewrite(log, lines(log)[:-cut])
    found = problems(log)
    assert found and names_record(found, 6), found


def test_an_edited_checkpoint_is_found(tmp_path: Path) -> None:
    log = new_log(tmp_path, 3)
    head = json.loads(log.head_path.read_bytes())
    head["seq"] = 2
    log.head_path.write_text(json.dumps(head))
    assert problems(log)


def test_a_torn_last_line_is_reported_and_the_reopened_log_carries_on(tmp_path: Path) -> None:
    log = new_log(tmp_path, 3)
    log.close()
    with log.path.open("ab") as f:
        f.write(b'{"seq":4,"ts":"2026-')  # a crash mid-write
    torn = AuditLog(log.path, clock=Clock(), key=KEY)
    found = problems(torn)
    assert len(found) == 1 and "line 4" in found[0], found
    torn.open()  # a broker starting on it ends the torn line and continues the chain
    OPEN.append(torn)
    torn.append("broker.start")
    torn.append("vault.unlock")
    found = problems(torn)
    assert len(found) == 1 and "line 4" in found[0], found
    assert [json.loads(r)["seq"] for r in lines(torn)[-2:]] == [4, 5]


def test_verify_without_the_key_reports_that_it_cannot_check(tmp_path: Path) -> None:
    log = new_log(tmp_path, 2, key=None)
    assert problems(log)


class _Full:
    """A file handle on a full disk: every write fails."""

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_an_unwritable_log_raises_storage_error_and_does_not_advance_the_chain(
    tmp_path: Path,
) -> None:
    log = new_log(tmp_path, 2)
    good = log._fh
    log._fh = _Full()  # type: ignore[assignment]
    with pytest.raises(StorageError) as err:
        log.append("tool", tool="add_entry")
    assert err.value.code == "STORAGE_ERROR"
    assert log.seq == 2
    log._fh = good
    log.append("tool", tool="add_entry")
    assert problems(log) == []


# ---------------------------------------------------------------------- fail closed, in-process


@dataclass
class Twin:
    state: State
    peer: Peer
    real_fh: Any = None

    @property
    def vault(self) -> Vault:
        return self.state.cache.get()

    def break_audit(self) -> None:
        assert self.state.audit is not None
        self.real_fh = self.state.audit._fh
        self.state.audit._fh = _Full()  # type: ignore[assignment]

    def session(self, scope: str = "write") -> tuple[str, SessionRecord]:
        spec = CreateSpec(label="t", scope=scope, ttl=timedelta(hours=1))  # type: ignore[arg-type]
        return self.state.sessions().create(spec)

    async def wire(self, method: str, params: dict[str, Any], **auth: str) -> Response:
        return await wire(self.state, self.peer, method, params, **auth)


def _seed_bank(vault: Vault) -> None:
    change = Change(fields={"username": "me"}, secrets={"password": SECRET}, remove_fields=[])
    vault.add("login", "bank", "default", [], None, None, change)


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with broker_state(tmp_path, PASSWORD, seed=_seed_bank) as state:
        t = Twin(state, Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
        yield t
    if t.real_fh is not None:
        t.real_fh.close()


@pytest.mark.anyio
async def test_a_read_with_an_unwritable_audit_log_gets_storage_error_not_the_secret(
    twin: Twin,
) -> None:
    token, _ = twin.session(scope="secrets")
    works = await twin.wire("entry.get", {"ref": "bank"}, token=token)
    assert works.ok and SECRET in works.encode().decode()
    twin.break_audit()
    for auth in ({"token": token}, {"password": PASSWORD}):
        refused = await twin.wire("entry.get", {"ref": "bank"}, **auth)
        assert refused.error is not None and refused.error.code == "STORAGE_ERROR"
        assert SECRET not in refused.encode().decode()


@pytest.mark.anyio
async def test_a_write_with_an_unwritable_audit_log_is_refused_before_any_change(
    twin: Twin,
) -> None:
    token, _ = twin.session(scope="write")
    before = twin.state.paths.vault.read_bytes()
    twin.break_audit()
    params = {"type": "api_key", "name": "new", "secrets": {"key": {"value": "v-1"}}}
    for auth in ({"token": token}, {"password": PASSWORD}):
        refused = await twin.wire("entry.add", params, **auth)
        assert refused.error is not None and refused.error.code == "STORAGE_ERROR"
    edit = await twin.wire("entry.edit", {"ref": "bank", "fields": {"username": "x"}}, token=token)
    assert edit.error is not None and edit.error.code == "STORAGE_ERROR"
    assert {e.name for e in twin.vault.entries.values()} == {"bank"}
    assert twin.vault.resolve("bank").fields["username"].value == "me"
    assert twin.state.paths.vault.read_bytes() == before


@pytest.mark.anyio
async def test_an_unlock_that_cannot_be_recorded_leaves_the_vault_locked(twin: Twin) -> None:
    twin.state.cache.lock()
    twin.break_audit()
    refused = await twin.wire("vault.unlock", {}, password=PASSWORD)
    assert refused.error is not None and refused.error.code == "STORAGE_ERROR"
    assert twin.state.cache.peek() is None


def _in_memory_host(twin: Twin, rec: SessionRecord) -> Any:
    host = McpHost(twin.state, transport=None)  # type: ignore[arg-type]
    conn = Connection(conn="c1", identity=b"id", accessor=rec.accessor, peer=twin.peer)
    return host._server(conn, rec)


@pytest.mark.anyio
async def test_mcp_tool_calls_with_an_unwritable_audit_log_are_refused(twin: Twin) -> None:
    _, rec = twin.session(scope="write")
    server = _in_memory_host(twin, rec)
    async with Client(server, mode="legacy") as client:
        ok = await client.call_tool("decrypt_entry", {"entry": "bank"})
        assert not ok.is_error and SECRET in ok.model_dump_json()
        preview = await client.call_tool(
            "add_entry", {"type": "api_key", "name": "new", "secrets": {"key": "v-1"}}
        )
        assert not preview.is_error and preview.structured_content is not None
        tx = preview.structured_content["tx_id"]
        twin.break_audit()
        results: list[mt.CallToolResult] = [
            await client.call_tool("decrypt_entry", {"entry": "bank"}),
            await client.call_tool("get_entry", {"entry": "bank"}),
            await client.call_tool("add_entry", {"tx_id": tx, "approve": True}),
        ]
    for r in results:
        assert error_body(r)["code"] == "STORAGE_ERROR"
        assert SECRET not in r.model_dump_json()
    assert {e.name for e in twin.vault.entries.values()} == {"bank"}


# ---------------------------------------------------------------------- the CLI, real broker


def audit_path(home: Path) -> Path:
    return home / "state" / "audit.jsonl"


def verify(apm: Apm) -> tuple[int, dict[str, Any]]:
    proc = apm("audit", "verify", "--json")
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def busy(apm: Apm, tag: str = "k") -> None:
    """Some audited traffic: adds, reads, a session, a failed unlock."""
    for i in range(3):
        apm.ok("add", "api_key", f"{tag}{i}", "--from-stdin", stdin=f"value-{i}\n")
    apm.ok("ls")
    apm.ok("delegate", "--scope", "read", "--ttl", "1h", "--json")
    apm("unlock", password=WRONG_PASSWORD)


def records(home: Path) -> list[bytes]:
    return audit_path(home).read_bytes().splitlines(keepends=True)


@dataclass
class Audited:
    """A real broker with a vault and some audited traffic, shared by the tamper tests."""

    home: Path
    apm: Apm
    broker: Broker


@pytest.fixture(scope="module")
def audited() -> Iterator[Audited]:
    home = make_home()
    broker = Broker(home).start()
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        busy(apm)
        yield Audited(home, apm, broker)
    finally:
        broker.stop()
        hits = sweep(home)
        SWEEP_HITS.extend(hits)
        shutil.rmtree(home, ignore_errors=True)
        assert not hits, f"secrets found in plaintext: {hits[:5]}"


@pytest.mark.slow
def test_a_clean_log_verifies_with_exit_code_zero(audited: Audited) -> None:
    code, res = verify(audited.apm)
    assert code == 0 and res["ok"] is True and res["findings"] == []
    assert res["records"] == len(records(audited.home)) > 5
    assert audited.apm("audit", "verify").returncode == 0


def _edit(rows: list[bytes]) -> int:
    doc = json.loads(rows[4])
    doc["code"] = "OK" if doc.get("code") != "OK" else "DENIED"
    rows[4] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return int(doc["seq"])


def _delete(rows: list[bytes]) -> int:
    seq = int(json.loads(rows[4])["seq"])
    del rows[4]
    return seq


def _reorder(rows: list[bytes]) -> int:
    rows[4], rows[5] = rows[5], rows[4]
    return int(json.loads(rows[4])["seq"])


def _truncate(rows: list[bytes]) -> int:
    last = int(json.loads(rows[-1])["seq"])
    del rows[-2:]
    return last


@pytest.mark.slow
@pytest.mark.parametrize(
    "tamper", [_edit, _delete, _reorder, _truncate], ids=["edit", "delete", "reorder", "truncate"]
)
def test_apm_audit_verify_exits_non_zero_naming_a_tampered_record(
    audited: Audited, tamper: Any
) -> None:
    apm, path = audited.apm, audit_path(audited.home)
    original = path.read_bytes()
    assert verify(apm)[0] == 0
    rows = records(audited.home)
    seq = tamper(rows)
    path.write_bytes(b"".join(rows))  # the broker keeps running
    try:
        code, res = verify(apm)
        assert code != 0 and res["ok"] is False
        assert names_record(res["findings"], seq), res["findings"]
        human = apm("audit", "verify")
        assert human.returncode != 0 and str(seq) in human.stdout
    finally:
        path.write_bytes(original)
    assert verify(apm)[0] == 0


@pytest.mark.slow
def test_a_torn_last_line_is_reported_and_the_broker_carries_on(
    vault: Broker, apm: Apm, home: Path
) -> None:
    busy(apm)
    vault.stop()
    n = len(records(home))
    with audit_path(home).open("ab") as f:
        f.write(b'{"event":"tool","seq":')  # a crash mid-write
    vault.start()
    apm.ok("unlock")
    apm.ok("add", "api_key", "after", "--from-stdin", stdin="value-after\n")
    assert apm.ok("get", "after", password=PASSWORD).stdout.strip() == "value-after"
    code, res = verify(apm)
    assert code != 0
    # only the torn line: the records written after it chain on from the last whole one
    assert len(res["findings"]) == 1 and f"line {n + 1}" in res["findings"][0], res
    assert json.loads(records(home)[n + 1])["event"] == "broker.start"


@pytest.mark.slow
def test_apm_audit_lists_security_events_and_filters_by_session(audited: Audited) -> None:
    apm, home = audited.apm, audited.home
    apm("unlock", password=WRONG_PASSWORD)
    apm.ok("add", "api_key", "k", "--from-stdin", stdin=f"{SECRET}\n")
    made = json.loads(apm.ok("delegate", "--scope", "secrets", "--ttl", "1h", "--json").stdout)
    token, accessor = made["token"], made["accessor"]
    env = {"APM_EPHEMERAL_ID": token}
    apm.env.update(env)
    try:
        assert apm("get", "k").stdout.strip() == SECRET
    finally:
        apm.env.clear()
    apm.ok("session", "revoke", accessor, password=None)
    apm.ok("lock", password=None)
    apm.ok("unlock")
    everything = json.loads(apm.ok("audit", "--json").stdout)
    events = [r["event"] for r in everything]
    for expected in ("vault.unlock", "vault.unlock_failed", "vault.lock", "request"):
        assert expected in events, events
    methods = {r.get("method") for r in everything}
    assert {"entry.add", "session.create", "session.revoke", "entry.get"} <= methods
    mine = json.loads(apm.ok("audit", "--json", "--session", accessor).stdout)
    assert mine and all(r["session"] == accessor for r in mine)
    assert any(r.get("method") == "entry.get" and r.get("code") == "OK" for r in mine)
    assert any(isinstance(r.get("pid"), int) and r.get("exe") for r in mine)
    last_two = json.loads(apm.ok("audit", "--json", "--limit", "2").stdout)
    assert len(last_two) == 2 and last_two[1]["seq"] == last_two[0]["seq"] + 1
    assert last_two[1]["seq"] >= everything[-1]["seq"]  # the newest ones
    text = audit_path(home).read_text() + audit_path(home).with_name("audit.jsonl.head").read_text()
    assert SECRET not in text and token not in text and PASSWORD not in text


def test_a_log_rewritten_without_authentication_codes_is_not_accepted(tmp_path: Path) -> None:
    log = new_log(tmp_path, 4)
    docs = [json.loads(r) for r in lines(log)]
    docs[1]["code"] = "FORGED"
    prev, out = GENESIS, []
    for d in docs:  # a forger without the key: strip every MAC and rebuild the hash chain
        d["prev"], d["mac"] = prev, None
        raw = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(raw).hexdigest()
        out.append(raw + b"\n")
    rewrite(log, out)
    log.head_path.write_text(json.dumps({"seq": 4, "hash": prev, "mac": None}))
    assert problems(log)


def test_truncation_with_the_checkpoint_deleted_is_found(tmp_path: Path) -> None:
    log = new_log(tmp_path, 6)
    rewrite(log, lines(log)[:-2])
    log.head_path.unlink()
    assert problems(log)


# ---------------------------------------------------------------------- deleted, replaced, journal


def test_a_log_deleted_under_an_open_audit_log_is_put_back_with_a_gap_record(
    tmp_path: Path,
) -> None:
    log = new_log(tmp_path, 3)
    kept = log.path.read_bytes()
    log.path.unlink()
    log.head_path.unlink()
    note = log.check_file()
    assert note is not None and "deleted" in note and log.incidents == [note]
    rows = lines(log)
    assert b"".join(rows[:3]) == kept  # the records written before, byte for byte
    gap = json.loads(rows[3])
    assert gap["event"] == "audit.gap" and gap["reason"] == "deleted" and gap["seq"] == 4
    assert gap["restored_records"] == 3
    assert json.loads(log.head_path.read_bytes())["seq"] == 4
    log.append("tool", tool="get_entry", entry="after", code="OK")
    found = log.verify()
    assert [f for f in found if not f.warning] == []
    assert [f.seq for f in found if f.warning] == [4]


def test_a_replaced_log_is_moved_aside_and_the_open_one_put_back(tmp_path: Path) -> None:
    log = new_log(tmp_path, 2)
    older = log.path.read_bytes()
    log.append("tool", tool="get_entry", entry="hidden", code="OK")
    fake = tmp_path / "fake"
    fake.write_bytes(older)
    fake.replace(log.path)
    note = log.check_file()
    assert note is not None and "replaced" in note
    aside = list(tmp_path.glob("audit.jsonl.replaced-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == older
    assert b'"entry":"hidden"' in log.path.read_bytes()
    assert [f for f in log.verify() if not f.warning] == []


def test_the_file_check_runs_every_check_every_records_not_on_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.core.audit as audit_mod

    log = new_log(tmp_path, 0)
    monkeypatch.setattr(audit_mod.time, "monotonic", lambda: log._checked_at)  # time stands
    calls: list[int] = []
    real = log._check_file
    monkeypatch.setattr(log, "_check_file", lambda: calls.append(log.seq) or real())
    log.path.unlink()  # noticed at the next due check, and nothing is lost until then
    for i in range(audit_mod.CHECK_EVERY + 1):
        log.append("tool", tool="get_entry", entry=f"e{i}", code="OK")
    assert len(calls) == 1
    assert log.path.exists() and len(lines(log)) == audit_mod.CHECK_EVERY + 2  # + gap record


def test_a_deleted_checkpoint_is_rewritten_and_reported(tmp_path: Path) -> None:
    log = new_log(tmp_path, 2)
    log.head_path.unlink()
    assert log.check_file() is None  # the log itself is fine
    assert json.loads(log.head_path.read_bytes())["seq"] == 2
    assert log.incidents and "checkpoint deleted" in log.incidents[0]


def test_verify_reports_a_log_shorter_than_or_diverging_from_the_vaults_record(
    tmp_path: Path,
) -> None:
    log = new_log(tmp_path, 5)
    seq, head = log.head()
    assert problems(log) == [] and [str(f) for f in log.verify((seq, head))] == []
    assert log.compare_vault_head((seq, head)) is None
    assert (
        log.compare_vault_head((3, hashlib.sha256(lines(log)[2].rstrip(b"\n")).hexdigest())) is None
    )
    shorter = [str(f) for f in log.verify((seq + 4, "f" * 64))]
    assert any("vault recorded record 9" in f for f in shorter), shorter
    assert "record 9" in (log.compare_vault_head((seq + 4, "f" * 64)) or "")
    other = [str(f) for f in log.verify((3, "e" * 64))]
    assert any(f.startswith("record 3:") and "vault" in f for f in other), other
    assert "vault" in (log.compare_vault_head((3, "e" * 64)) or "")


def test_reopening_a_log_rebuilds_its_journal_of_saves_and_revocations(tmp_path: Path) -> None:
    log = new_log(tmp_path, 1)
    log.append("vault.saved", generation=4)
    log.append("session.revoked", target="ses_a,ses_b")
    log.append("vault.saved", generation=5)
    log.append("session.revoked", target="all", pending=True, all_before="2026-11-20T12:00:00")
    log.append("session.revoked", target=None, how="token")  # revoked nothing
    live = log.journal
    log.close()
    OPEN.remove(log)
    again = new_log(tmp_path)
    for j in (live, again.journal):
        assert (j.generation, j.generation_seq) == (5, 4)
        assert [(r.seq, r.accessors, r.all_before) for r in j.revocations] == [
            (3, ("ses_a", "ses_b"), None),
            (5, (), "2026-11-20T12:00:00"),
        ]
        assert [r.seq for r in j.revocations_after(3)] == [5]


@pytest.mark.parametrize("field", ["seq", "ts", "prev", "mac"])
def test_a_record_refuses_fields_that_would_overwrite_the_chain(tmp_path: Path, field: str) -> None:
    log = new_log(tmp_path, 1)
    with pytest.raises(ValueError):
        log.append("tool", **{field: 7})
    assert problems(log) == []
