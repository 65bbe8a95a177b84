"""Three real brokers (separate APM_HOMEs) share a space through a real 3-member etcd cluster,
driven by the real `apm` CLI: set-up by invite/join/approve, propagation, conflicts, tampering
seen in `apm sync status`, removal, session revocation, and catching up after a stop.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from broker.cli.client import BrokerClient
from broker.core.sync_etcd import EtcdClient, TlsFiles
from broker.wire.errors import TransactionConflict
from broker.wire.protocol import EntryEditParams, EntryRef
from tests.conftest import (
    PASSWORD,
    SWEEP_HITS,
    Apm,
    Broker,
    make_home,
    reap_brokers,
    register_secret,
    sweep,
)
from tests.etcd_cluster import EtcdCluster
from tests.mcp_client import error_of, ok_of, shim_client

pytestmark = pytest.mark.slow

SECRET_A = "s3cr3t-value-from-device-a"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    c = EtcdCluster.start()
    try:
        yield c
    finally:
        c.stop()


def _etcd_args(c: EtcdCluster) -> list[str]:
    t = c.client_tls()
    return ["--etcd", ",".join(c.endpoints), "--cacert", t["cacert"], "--cert", t["cert"],
            "--key", t["key"]]  # fmt: skip


def _wait(pred: Any, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Device:
    def __init__(self, name: str) -> None:
        self.home = make_home()
        self.name = name
        self.apm = Apm(self.home)
        self.broker = Broker(self.home)

    def client(self) -> BrokerClient:
        return BrokerClient(addr=f"ipc://{self.home}/run/broker.sock")

    def names(self, space: str = "team") -> list[str]:
        proc = self.apm("ls", "--space", space, "--json", password=PASSWORD)
        if proc.returncode != 0:
            return []
        return sorted(e["name"] for e in json.loads(proc.stdout))

    def secret(self, name: str) -> str:
        return self.apm.ok("get", name, "--space", "team").stdout.strip()

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.apm.ok("sync", "status", "--json").stdout)
        return doc


@pytest.fixture(scope="module")
def devices(cluster: EtcdCluster) -> Iterator[list[Device]]:
    devs = [Device(n) for n in "abc"]
    try:
        a, b, c = devs
        for d in devs:
            d.broker.start()
            d.apm.ok("init", "--profile", "interactive")
        a.apm.ok("space", "add", "team")
        a.apm.ok(
            "add", "login", "github", "--space", "team", "--field", "username=octo",
            "--secret-field", "password", "--from-stdin", stdin=SECRET_A,
        )  # fmt: skip
        out = json.loads(
            a.apm.ok("sync", "init", *_etcd_args(cluster), "--space", "team", "--json").stdout
        )
        assert out["uploaded"] == 1
        for d in (b, c):
            code = a.apm.ok("sync", "invite", "--space", "team").stdout.strip()
            register_secret(code)  # one-time, but a credential: never on disk or in a log
            joined = json.loads(
                d.apm.ok("sync", "join", "-", *_etcd_args(cluster), "--json", stdin=code).stdout
            )
            a.apm.ok("sync", "approve", joined["device"])
        for d in (b, c):
            _wait(lambda d=d: d.names() == ["github"], f"{d.name} to receive the space")
        yield devs
    finally:
        for d in devs:
            d.broker.stop()
            reap_brokers(d.home)
        # no secret value, password, token or join code in plaintext in any file of any home
        # (vaults, replicas, logs, audit logs)
        hits = [h for d in devs for h in sweep(d.home)]
        SWEEP_HITS.extend(hits)
        for d in devs:
            shutil.rmtree(d.home, ignore_errors=True)
        assert not hits, f"secrets found in plaintext: {hits[:5]}"


def test_an_entry_added_on_a_is_readable_on_b_and_c(devices: list[Device]) -> None:
    a, b, c = devices
    assert b.secret("github") == SECRET_A
    a.apm.ok(
        "add", "login", "aws", "--space", "team", "--field", "username=root",
        "--secret-field", "password", "--from-stdin", stdin="aws-secret-value",
    )  # fmt: skip
    for d in (b, c):
        _wait(lambda d=d: "aws" in d.names(), f"aws on {d.name}")
        assert d.secret("aws") == "aws-secret-value"


def test_concurrent_edits_of_one_entry_one_wins_the_other_gets_transaction_conflict(
    devices: list[Device],
) -> None:
    a, b, c = devices
    pw = SecretStr(PASSWORD)
    with a.client() as ca, b.client() as cb:
        ea = ca.call("entry.show", EntryRef(ref="github", space="team"), password=pw).entry
        eb = cb.call("entry.show", EntryRef(ref="github", space="team"), password=pw).entry
        assert ea.id == eb.id and ea.updated_at == eb.updated_at  # both prepared from one state
        ca.call(
            "entry.edit",
            EntryEditParams(ref=ea.id, expect_updated_at=ea.updated_at, url="https://a.example"),
            password=pw,
        )
        with pytest.raises(TransactionConflict) as exc:
            cb.call(
                "entry.edit",
                EntryEditParams(
                    ref=eb.id, expect_updated_at=eb.updated_at, url="https://b.example"
                ),
                password=pw,
            )
        assert exc.value.code == "TRANSACTION_CONFLICT"

    def url_on(d: Device) -> str | None:
        shown = json.loads(d.apm.ok("show", "github", "--space", "team", "--json").stdout)
        return shown.get("url")

    for d in (a, b, c):
        _wait(lambda d=d: url_on(d) == "https://a.example", f"the winner on {d.name}")


def test_etcd_holds_no_entry_name_username_url_or_secret(
    cluster: EtcdCluster, devices: list[Device]
) -> None:
    client = EtcdClient(cluster.endpoints, TlsFiles(**cluster.client_tls()))
    try:
        kvs, _ = client.range("/", prefix=True)
    finally:
        client.close()
    blob = b"\n".join(kv.key.encode() + b"\0" + kv.value for kv in kvs)
    assert len(kvs) >= 8
    for plain in ("github", "octo", SECRET_A, "aws-secret-value", "a.example", "team", PASSWORD):
        for form in (plain.encode(), base64.b64encode(plain.encode())):
            assert form not in blob, f"{plain!r} visible in etcd"


def test_a_byte_flipped_in_etcd_refuses_that_entry_and_apm_sync_status_lists_it(
    cluster: EtcdCluster, devices: list[Device]
) -> None:
    a, b, _ = devices
    a.apm.ok(
        "add", "login", "victim", "--space", "team", "--field", "username=v",
        "--secret-field", "password", "--from-stdin", stdin="victim-secret",
    )  # fmt: skip
    _wait(lambda: "victim" in b.names(), "victim on b")
    space_id = b.status()["spaces"][0]["space"]
    vid = json.loads(a.apm.ok("show", "victim", "--space", "team", "--json").stdout)["id"]
    client = EtcdClient(cluster.endpoints, TlsFiles(**cluster.client_tls()))
    try:
        key = f"/apm/v1/{space_id}/entries/{vid}"
        kv = client.get(key)
        assert kv is not None
        raw = bytearray(kv.value)
        i = raw.index(b'"ct":"') + 20
        raw[i] = ord("A") if raw[i] != ord("A") else ord("B")
        client.put(key, bytes(raw))
    finally:
        client.close()
    _wait(lambda: any(r["key"] == key for r in b.status()["spaces"][0]["refused"]), "refusal")
    refused = b.status()["spaces"][0]["refused"]
    assert [r["key"] for r in refused] == [key]
    human = b.apm.ok("sync", "status").stdout
    assert "refused in team" in human and vid in human
    # the others are unaffected
    assert b.secret("github") == SECRET_A
    # a member rewriting the entry clears it
    a.apm.ok("edit", "victim", "--space", "team", "--url", "https://fixed.example")
    _wait(lambda: b.status()["spaces"][0]["refused"] == [], "refusal cleared")


def test_a_broker_stopped_during_changes_catches_up_when_it_starts(devices: list[Device]) -> None:
    a, _, c = devices
    c.broker.stop()
    a.apm.ok(
        "add", "login", "while-away", "--space", "team", "--field", "username=w",
        "--secret-field", "password", "--from-stdin", stdin="away-secret",
    )  # fmt: skip
    c.broker.start()
    c.apm.ok("unlock")
    _wait(lambda: "while-away" in c.names(), "c to catch up")
    assert c.secret("while-away") == "away-secret"


def test_revoke_sessions_record_revokes_the_target_devices_sessions(
    devices: list[Device],
) -> None:
    a, b, _ = devices
    b.apm.ok("delegate", "--scope", "read", "--ttl", "10m")
    sessions = json.loads(b.apm.ok("session", "ls", "--json").stdout)
    assert any(s["state"] == "active" for s in sessions)
    dev_b = b.status()["device"]
    a.apm.ok("sync", "revoke-sessions", dev_b)

    def none_active() -> bool:
        listed = json.loads(b.apm.ok("session", "ls", "--json").stdout)
        return all(s["state"] != "active" for s in listed)

    _wait(none_active, "b's sessions revoked")


def _token(d: Device, scope: str, *extra: str) -> str:
    out = json.loads(
        d.apm.ok("delegate", "--scope", scope, "--ttl", "10m", "--json", *extra).stdout
    )
    token: str = out["token"]
    return token


@pytest.mark.anyio
async def test_mcp_cloud_sync_needs_write_scope_and_reports_status_and_syncs_now(
    devices: list[Device],
) -> None:
    a = devices[0]
    async with shim_client(a.home, _token(a, "read"), "legacy", 30.0) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "cloud_sync" not in names
        refused = await client.call_tool("cloud_sync", {})
        assert error_of(refused)["code"] in ("PERMISSION_DENIED", "INVALID_PARAMETERS")
    async with shim_client(a.home, _token(a, "write"), "legacy", 30.0) as client:
        st = ok_of(await client.call_tool("cloud_sync", {"action": "status"}))
        assert st["configured"] and st["spaces"][0]["name"] == "team"
        now = ok_of(await client.call_tool("cloud_sync", {"action": "sync_now"}))
        assert now["spaces"][0]["resyncs"] >= 1
        assert "cloud_config" not in {t.name for t in (await client.list_tools()).tools}


@pytest.mark.anyio
async def test_mcp_cloud_config_shows_and_a_change_waits_for_the_owner(
    cluster: EtcdCluster, devices: list[Device]
) -> None:
    a = devices[0]
    # an agent-approved admin session still cannot approve a configuration change itself
    async with shim_client(a.home, _token(a, "admin", "--approve", "agent"), "legacy", 30.0) as c:
        shown = ok_of(await c.call_tool("cloud_config", {}))
        assert shown["endpoints"] == cluster.endpoints and "team" in shown["spaces"]
        new = list(reversed(cluster.endpoints))
        pending = ok_of(
            await c.call_tool("cloud_config", {"action": "set_endpoints", "endpoints": new})
        )
        tx = pending["change"]["tx_id"]
        assert pending["change"]["policy"] == "owner"
        early = ok_of(await c.call_tool("cloud_config", {"tx_id": tx, "approve": True}))
        assert early["change"]["status"] == "pending_owner_approval"
        a.apm.ok("tx", "approve", tx)
        done = ok_of(await c.call_tool("cloud_config", {"tx_id": tx, "approve": True}))
        assert done["change"]["status"] == "committed"
        assert ok_of(await c.call_tool("cloud_config", {}))["endpoints"] == new
    st = a.status()
    assert st["configured"] and all(ep["ok"] for ep in st["endpoints"])


def test_a_rolled_back_vault_is_reported_against_the_generation_the_cluster_holds(
    devices: list[Device],
) -> None:
    a = devices[0]
    a.broker.stop()
    kept = {p.name: p.read_bytes() for p in a.home.glob("vault.apm*")}
    a.broker.start()
    a.apm.ok("unlock")
    before = a.status()["spaces"][0].get("anchor_generation") or 0
    a.apm.ok(
        "add", "login", "after-backup", "--space", "team", "--field", "username=z",
        "--secret-field", "password", "--from-stdin", stdin="after-backup-secret",
    )  # fmt: skip
    _wait(
        lambda: (a.status()["spaces"][0].get("anchor_generation") or 0) > before,
        "the new generation announced",
    )
    assert not a.status()["rollback_suspected"]
    a.broker.stop()
    for p in a.home.glob("vault.apm*"):
        p.unlink()
    for name, data in kept.items():
        (a.home / name).write_bytes(data)
    a.broker.start()
    a.apm.ok("unlock")
    _wait(lambda: a.status()["rollback_suspected"], "the rollback reported")
    # the replica still holds what the rolled-back file lost: it comes back
    _wait(lambda: "after-backup" in a.names(), "the lost entry restored from the replica")


def test_a_synced_space_cannot_be_renamed_or_removed_locally(devices: list[Device]) -> None:
    b = devices[1]
    for args in (("space", "rename", "team", "other"), ("space", "rm", "team", "--force")):
        proc = b.apm(*args, password=PASSWORD)
        assert proc.returncode == 10, proc.stderr
        assert "synced space" in proc.stderr
    assert "github" in b.names() and "github" in devices[0].names()


def test_zz_a_removed_device_reads_nothing_new_and_its_writes_are_refused(
    devices: list[Device],
) -> None:
    a, b, c = devices
    dev_c = c.status()["device"]
    a.apm.ok("sync", "remove", dev_c, "--space", "team")
    a.apm.ok(
        "add", "login", "after-removal", "--space", "team", "--field", "username=x",
        "--secret-field", "password", "--from-stdin", stdin="after-removal-secret",
    )  # fmt: skip
    _wait(lambda: "after-removal" in b.names(), "b gets the new entry")
    time.sleep(0.5)  # give c's watch the same chance (not an assertion on time)
    assert "after-removal" not in c.names()
    proc = c.apm(
        "edit", "github", "--space", "team", "--url", "https://c.example", password=PASSWORD
    )
    assert proc.returncode != 0
    assert "SYNC_NOT_MEMBER" in proc.stderr or "not a member" in proc.stderr


def test_sync_status_shows_endpoints_members_and_lag(devices: list[Device]) -> None:
    a, b, _ = devices
    st = a.status()
    assert st["configured"] and all(ep["ok"] for ep in st["endpoints"])
    space = st["spaces"][0]
    assert space["name"] == "team" and b.status()["device"] in space["members"]
    assert space["applied_revision"] > 0
    _wait(lambda: a.status()["spaces"][0]["pending_changes"] == 0, "a caught up")


def test_etcd_member_failures_one_down_writes_go_on_two_down_refused_then_caught_up(
    tmp_path: object,
) -> None:
    own = EtcdCluster.start()  # members are killed here: not the module's cluster
    devs = [Device(n) for n in "xy"]
    try:
        a, b = devs
        for d in devs:
            d.broker.start()
            d.apm.ok("init", "--profile", "interactive")
        a.apm.ok("space", "add", "team")
        a.apm.ok("sync", "init", *_etcd_args(own), "--space", "team")
        code = a.apm.ok("sync", "invite", "--space", "team").stdout.strip()
        joined = json.loads(b.apm.ok("sync", "join", code, *_etcd_args(own), "--json").stdout)
        a.apm.ok("sync", "approve", joined["device"])

        def add(d: Device, name: str, space: str = "team") -> Any:
            return d.apm(
                "add", "login", name, "--space", space, "--field", "username=u",
                "--secret-field", "password", "--from-stdin", stdin=f"{name}-secret",
                password=PASSWORD,
            )  # fmt: skip

        assert add(a, "before").returncode == 0
        _wait(lambda: "before" in b.names(), "b to receive before")
        own.kill(0)
        assert add(a, "one-down").returncode == 0
        _wait(lambda: "one-down" in b.names(), "b to receive one-down")
        own.kill(1)
        refused = add(a, "two-down")
        assert refused.returncode == 9
        assert "SYNC_UNAVAILABLE" in refused.stderr or "no quorum" in refused.stderr
        assert "hint:" in refused.stderr
        assert "two-down" not in a.names()  # undone locally: nothing the others will not see
        assert b.secret("before") == "before-secret"  # reads from the replica
        assert add(a, "local-still-works", space="default").returncode == 0
        own.restart(0)
        own.restart(1)
        own.wait_healthy()
        assert add(a, "after-restart").returncode == 0
        _wait(lambda: "after-restart" in b.names(), "b to catch up without a restart")
    finally:
        for d in devs:
            d.broker.stop()
            reap_brokers(d.home)
        hits = [h for d in devs for h in sweep(d.home)]
        SWEEP_HITS.extend(hits)
        for d in devs:
            shutil.rmtree(d.home, ignore_errors=True)
        own.stop()
        assert not hits, f"secrets found in plaintext: {hits[:5]}"
