"""Synced spaces against a real 3-member etcd cluster (TLS client certs, loopback): three
devices with their own homes and replicas share a space; attacks on etcd's contents are run
and refused.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.core import crypto
from broker.core.sync import ROOT, Device, SyncedSpace, _signed
from broker.core.sync_etcd import EtcdClient, TlsFiles
from broker.wire.errors import (
    InvalidParameters,
    SyncNotMember,
    SyncRecordRefused,
    SyncUnavailable,
    TransactionConflict,
)
from tests.etcd_cluster import EtcdCluster

pytestmark = pytest.mark.slow

PLAINTEXTS = {
    "name": "prod-postgres-primary",
    "username": "svc_billing_admin",
    "url": "https://db.internal.example.com:5432",
    "password": "Tr0ub4dor&3-horse-staple",
    "token": "ghp_7fQ2xYzLmN3pRsTuVwXyZ0aBcDeFgHiJkL",
    "secret": "totp-seed-JBSWY3DPEHPK3PXP",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    c = EtcdCluster.start()
    try:
        yield c
    finally:
        c.stop()


@dataclass
class Node:
    device: Device
    client: EtcdClient
    home: Path
    space: SyncedSpace | None = None

    def open(self, space_id: str, admin_ed: bytes) -> SyncedSpace:
        self.space = SyncedSpace(
            self.client, self.device, space_id, admin_ed, self.home / f"sync-{space_id}.db"
        )
        self.space.start()
        return self.space

    @property
    def s(self) -> SyncedSpace:
        assert self.space is not None
        return self.space


def _client(cluster: EtcdCluster) -> EtcdClient:
    return EtcdClient(cluster.endpoints, TlsFiles(**cluster.client_tls()))


def _node(cluster: EtcdCluster, tmp: Path, name: str) -> Node:
    home = tmp / name
    home.mkdir()
    return Node(Device.new(), _client(cluster), home)


def _space(cluster: EtcdCluster, tmp: Path, n: int = 3) -> tuple[str, list[Node]]:
    """A fresh space made on A; B, C... joined through invite → join → approve."""
    space_id = "sp-" + secrets.token_hex(4)
    a = _node(cluster, tmp, "a")
    a.space = SyncedSpace.create(a.client, a.device, space_id, a.home / f"sync-{space_id}.db")
    a.s.start()
    nodes = [a]
    for name in "bcdefg"[: n - 1]:
        node = _node(cluster, tmp, name)
        code = a.s.invite()
        jc = SyncedSpace.request_join(node.client, node.device, code)
        a.s.approve(node.device.id)
        node.open(space_id, jc.admin_ed)
        nodes.append(node)
    return space_id, nodes


def _wait_all(nodes: list[Node], rev: int) -> None:
    for n in nodes:
        assert n.s.wait_applied(rev, timeout=15), f"{n.device.id} did not apply {rev}"


def _stop(nodes: list[Node]) -> None:
    for n in nodes:  # all watchers told first, so their idle timeouts run together
        if n.space is not None:
            n.space._stop.set()
    for n in nodes:
        if n.space is not None:
            n.space.stop()
        n.client.close()


@pytest.fixture
def trio(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[str, list[Node]]]:
    space_id, nodes = _space(cluster, tmp_path)
    yield space_id, nodes
    _stop(nodes)


def test_an_entry_added_on_a_is_readable_on_b_and_c(trio: tuple[str, list[Node]]) -> None:
    _, (a, b, c) = trio
    rev = a.s.put("e1", {"name": "github", "password": "pw-1"})
    _wait_all([b, c], rev)
    assert b.s.get("e1") == {"name": "github", "password": "pw-1"}
    assert c.s.get("e1") == {"name": "github", "password": "pw-1"}
    rev = c.s.put("e1", {"name": "github", "password": "pw-2"})
    _wait_all([a, b], rev)
    assert a.s.get("e1") == {"name": "github", "password": "pw-2"}


def test_concurrent_edits_of_one_entry_exactly_one_wins_the_other_conflicts(
    trio: tuple[str, list[Node]],
) -> None:
    _, (a, b, c) = trio
    _wait_all([a, b, c], a.s.put("e1", {"v": "base"}))
    # both previews made from the same state; the etcd txn decides which commit lands
    prepared = [
        (a, a.s.prepare([("e1", {"v": "from-a"})])),
        (b, b.s.prepare([("e1", {"v": "from-b"})])),
    ]
    outcomes: list[str] = []
    for node, prep in prepared:
        try:
            node.s.commit(prep)
            outcomes.append("ok")
        except TransactionConflict as exc:
            outcomes.append(exc.code)
            assert exc.data["current"] == [{"entry_id": "e1", "version": 2}]
    assert outcomes == ["ok", "TRANSACTION_CONFLICT"]
    # the loser's replica now holds the winner, and a retry from it commits
    assert b.s.get("e1") == {"v": "from-a"}
    rev = b.s.put("e1", {"v": "from-b, after review"})
    _wait_all([a, c], rev)
    assert c.s.get("e1") == {"v": "from-b, after review"}


def test_a_delete_is_a_sealed_tombstone_that_replicates(trio: tuple[str, list[Node]]) -> None:
    _, (a, b, _) = trio
    _wait_all([b], a.s.put("gone", {"name": "x"}))
    _wait_all([b], a.s.delete("gone"))
    assert b.s.get("gone") is None


def test_etcd_holds_no_name_username_url_secret_token_or_password(
    cluster: EtcdCluster, trio: tuple[str, list[Node]]
) -> None:
    _, (a, b, _) = trio
    rev = 0
    for i in range(3):
        rev = a.s.put(f"e{i}", {**PLAINTEXTS, "i": i})
    code = a.s.invite()
    extra = Node(Device.new(), _client(cluster), b.home)
    SyncedSpace.request_join(extra.client, extra.device, code)
    _wait_all([b], rev)
    kvs, _ = a.client.range(ROOT, prefix=True)
    blob = b"\n".join(kv.key.encode() + b"=" + kv.value for kv in kvs)
    assert len(kvs) > 5
    for what, plain in PLAINTEXTS.items():
        for form in (plain.encode(), base64.b64encode(plain.encode())):
            assert form not in blob, f"{what} visible in etcd"
    # nor the join code's secret
    secret = json.loads(base64.urlsafe_b64decode(code.split(".", 1)[1] + "=="))["k"]
    assert secret.encode() not in blob
    extra.client.close()


def test_a_byte_flipped_in_one_etcd_value_refuses_that_entry_only(
    trio: tuple[str, list[Node]],
) -> None:
    space_id, (a, b, _) = trio
    a.s.put("good", {"password": "p1"})
    _wait_all([b], a.s.put("victim", {"password": "p2"}))
    key = f"{ROOT}{space_id}/entries/victim"
    kv = a.client.get(key)
    assert kv is not None
    rec = json.loads(kv.value)
    ct = bytearray(base64.urlsafe_b64decode(rec["ct"] + "=="))
    ct[20] ^= 0x01
    rec["ct"] = base64.urlsafe_b64encode(bytes(ct)).decode().rstrip("=")
    rev = a.client.put(key, json.dumps(rec).encode())  # the attacker writes etcd directly
    _wait_all([a, b], rev)  # a too: its next write must be prepared over the flipped record
    with pytest.raises(SyncRecordRefused) as exc:
        b.s.get("victim")
    assert exc.value.code == "SYNC_RECORD_REFUSED"
    refused = b.s.status(health=False)["refused"]
    assert [r["key"] for r in refused] == [key]
    assert "authentication" in refused[0]["reason"]
    assert b.s.get("good") == {"password": "p1"}
    # a good write from a member replaces the refused record
    rev = a.s.put("victim", {"password": "p3"})
    _wait_all([b], rev)
    assert b.s.get("victim") == {"password": "p3"}
    assert b.s.status(health=False)["refused"] == []


def test_a_replayed_older_version_is_refused(trio: tuple[str, list[Node]]) -> None:
    space_id, (a, b, _) = trio
    key = f"{ROOT}{space_id}/entries/e1"
    a.s.put("e1", {"password": "old"})
    old = a.client.get(key)
    assert old is not None
    _wait_all([b], a.s.put("e1", {"password": "new"}))
    rev = a.client.put(key, old.value)  # a valid, authentic, older ciphertext put back
    _wait_all([b], rev)
    with pytest.raises(SyncRecordRefused):
        b.s.get("e1")
    st = b.s.status()
    assert "replayed" in st["refused"][0]["reason"]
    assert st["pending_changes"] == 0 and all(ep["ok"] for ep in st["endpoints"])


def test_a_forged_membership_record_is_refused(trio: tuple[str, list[Node]]) -> None:
    space_id, (a, b, _) = trio
    mallory = Device.new()  # signs its own member record: not the space's admin
    forged = _signed({**mallory.public_doc(), "space": space_id}, mallory.id, mallory.sign_priv)
    key = f"{ROOT}{space_id}/members/{mallory.id}"
    rev = a.client.put(key, forged)
    _wait_all([b], rev)
    refused = b.s.status(health=False)["refused"]
    assert [r["key"] for r in refused] == [key]
    assert "signature" in refused[0]["reason"]
    assert mallory.id not in b.s.members()


def test_a_join_code_works_once(cluster: EtcdCluster, trio: tuple[str, list[Node]]) -> None:
    _, (a, b, _) = trio
    code = a.s.invite()
    d1, d2 = Device.new(), Device.new()
    SyncedSpace.request_join(b.client, d1, code)
    SyncedSpace.request_join(b.client, d2, code)
    a.s.approve(d1.id)
    with pytest.raises(InvalidParameters):
        a.s.approve(d2.id)
    assert d1.id in a.s.members() and d2.id not in a.s.members()


def test_a_join_request_with_a_made_up_code_is_not_approved(trio: tuple[str, list[Node]]) -> None:
    _, (a, b, _) = trio
    real = a.s.invite()
    jc = SyncedSpace.request_join(b.client, Device.new(), real)
    fake = jc.__class__(jc.space, jc.admin, jc.admin_x, jc.admin_ed, b"\0" * 16).encode()
    mallory = Device.new()
    SyncedSpace.request_join(b.client, mallory, fake)
    with pytest.raises(InvalidParameters):
        a.s.approve(mallory.id)


def test_a_removed_device_cannot_read_later_entries_and_its_writes_are_refused(
    trio: tuple[str, list[Node]],
) -> None:
    space_id, (a, b, c) = trio
    _wait_all([b, c], a.s.put("before", {"password": "old-secret"}))
    rev = a.s.remove(c.device.id)
    _wait_all([b, c], rev)
    rev = a.s.put("after", {"password": "written-after-removal"})
    _wait_all([b, c], rev)
    assert b.s.get("after") == {"password": "written-after-removal"}
    # C's broker: not a member any more, so its own writes are refused
    with pytest.raises(SyncNotMember) as exc:
        c.s.put("after", {"password": "from-c"})
    assert exc.value.code == "SYNC_NOT_MEMBER"
    # C's keys: none of them opens the new record (it was sealed under the new epoch's key)
    kv = a.client.get(f"{ROOT}{space_id}/entries/after")
    assert kv is not None
    assert json.loads(kv.value)["e"] == 2
    assert c.s._cipher(2) is None
    with pytest.raises(crypto.DecryptionFailed):
        old = c.s._cipher(1)
        assert old is not None
        rec = json.loads(kv.value)
        from broker.core.sync import entry_ad

        old.open(base64.urlsafe_b64decode(rec["ct"] + "=="), entry_ad(space_id, "after", 1, 2))
    # C forging a write with the old key straight into etcd: every member refuses it
    old_cipher = c.s._cipher(1)
    assert old_cipher is not None
    from broker.core.sync import entry_ad

    ct = old_cipher.seal(b'{"password":"evil"}', entry_ad(space_id, "after", 9, 1))
    forged = json.dumps(
        {"v": 9, "e": 1, "ct": base64.urlsafe_b64encode(ct).decode().rstrip("=")}
    ).encode()
    rev = c.client.put(f"{ROOT}{space_id}/entries/after", forged)
    _wait_all([b], rev)
    with pytest.raises(SyncRecordRefused):
        b.s.get("after")
    assert "retired key epoch" in b.s.status(health=False)["refused"][0]["reason"]


def test_a_device_stopped_during_changes_catches_up_at_start(
    trio: tuple[str, list[Node]],
) -> None:
    space_id, (a, b, _) = trio
    _wait_all([b], a.s.put("e0", {"n": 0}))
    b.s.stop()
    rev = 0
    for i in range(1, 6):
        rev = a.s.put(f"e{i}", {"n": i})
    node = b.open(space_id, a.device.sign_pub)  # same home, same replica file
    assert node.wait_applied(rev, timeout=15)
    assert [node.get(f"e{i}") for i in range(6)] == [{"n": i} for i in range(6)]
    assert node.resyncs == 0  # it followed the watch from its last revision


def test_compaction_past_a_stopped_device_revision_forces_a_resync(
    trio: tuple[str, list[Node]],
) -> None:
    space_id, (a, b, _) = trio
    _wait_all([b], a.s.put("e0", {"n": 0}))
    b.s.stop()
    rev = 0
    for i in range(1, 4):
        rev = a.s.put(f"e{i}", {"n": i})
    a.client.compact(rev)
    node = b.open(space_id, a.device.sign_pub)
    assert node.wait_applied(rev, timeout=15)
    assert node.get("e3") == {"n": 3}
    assert node.resyncs >= 1
    assert node.status(health=False)["refused"] == []


def test_a_session_revocation_record_reaches_the_target_device(
    trio: tuple[str, list[Node]],
) -> None:
    space_id, (a, b, _) = trio
    got: list[dict[str, object]] = []
    b.s.on_revocation = got.append
    rev = a.s.revoke_sessions(b.device.id)
    _wait_all([b], rev)
    assert [r["action"] for r in got] == ["revoke-sessions"]
    # one not signed by the admin does nothing
    forged = _signed(
        {"device": b.device.id, "action": "revoke-sessions", "id": "x"},
        b.device.id,
        b.device.sign_priv,
    )
    rev = b.client.put(f"{ROOT}{space_id}/revocations/{b.device.id}/x", forged)
    _wait_all([b], rev)
    assert len(got) == 1


def test_each_device_publishes_a_signed_audit_head_the_others_can_check(
    trio: tuple[str, list[Node]],
) -> None:
    _, (a, b, _) = trio
    rev = b.s.publish_audit_head("ab" * 32, 41)
    _wait_all([a], rev)
    head = a.s.audit_head(b.device.id)
    assert head is not None and head["generation"] == 41


def test_member_failures_one_down_writes_go_on_two_down_refused_reads_work_then_catch_up(
    tmp_path: Path,
) -> None:
    own = EtcdCluster.start()  # this test kills members: its own cluster
    nodes: list[Node] = []
    try:
        _, nodes = _space(own, tmp_path)
        a, b, c = nodes
        _wait_all([b, c], a.s.put("e0", {"n": 0}))
        own.kill(0)
        rev = a.s.put("e1", {"n": 1})
        _wait_all([b, c], rev)
        assert c.s.get("e1") == {"n": 1}
        own.kill(1)
        with pytest.raises(SyncUnavailable) as exc:
            a.s.put("e2", {"n": 2})
        assert exc.value.code == "SYNC_UNAVAILABLE"
        assert exc.value.hint and "replica" in exc.value.hint
        assert b.s.get("e1") == {"n": 1}  # reads from the local replica
        own.restart(0)
        own.restart(1)
        own.wait_healthy()
        rev = a.s.put("e2", {"n": 2})
        _wait_all([b, c], rev)  # the same brokers: no restart
        assert b.s.get("e2") == {"n": 2}
    finally:
        _stop(nodes)
        own.stop()


def test_a_space_key_wrapped_to_one_device_opens_only_with_that_device_and_its_ad() -> None:
    one, other = Device.new(), Device.new()
    key = crypto.new_key()
    blob = crypto.wrap_to(one.x_pub, key, b"ad-1")
    assert crypto.unwrap_from(one.x_priv, blob, b"ad-1") == key
    with pytest.raises(crypto.DecryptionFailed):
        crypto.unwrap_from(other.x_priv, blob, b"ad-1")
    with pytest.raises(crypto.DecryptionFailed):
        crypto.unwrap_from(one.x_priv, blob, b"ad-2")
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(crypto.DecryptionFailed):
        crypto.unwrap_from(one.x_priv, bytes(flipped), b"ad-1")
    # a fresh ephemeral key every time: the same key wraps to different blobs
    assert crypto.wrap_to(one.x_pub, key, b"ad-1") != blob


def test_signatures_verify_only_for_the_signer_and_the_exact_message() -> None:
    a, b = Device.new(), Device.new()
    sig = crypto.sign(a.sign_priv, b"members: a")
    assert crypto.verify(a.sign_pub, sig, b"members: a")
    assert not crypto.verify(b.sign_pub, sig, b"members: a")
    assert not crypto.verify(a.sign_pub, sig, b"members: a, mallory")
    assert not crypto.verify(a.sign_pub, b"\0" * 64, b"members: a")


def test_a_join_code_that_is_not_one_is_invalid_parameters() -> None:
    from broker.core.sync import JoinCode

    for bad in ("", "apmjoin1.", "apmjoin1.!!!", "something-else"):
        with pytest.raises(InvalidParameters):
            JoinCode.decode(bad)
