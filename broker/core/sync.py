"""Synced spaces: entries sealed under a per-space key, shared through etcd, replicated into a
local store that reads come from.

Layout under /apm/v1/<space-id>/ (etcd sees ids, sizes and timing; never a name or a value):

    meta                      {space, admin device, admin public keys}, signed by the admin
    members/<device>          {device, x25519 pub, ed25519 pub, role}, signed by the admin
    epoch                     {epoch, members}, signed by the admin; a new epoch = a new key
    keys/<epoch>/<device>     the epoch's space key wrapped to that device (X25519+HKDF+GCM)
    entries/<entry-id>        {v, e, ct}: AES-GCM(space key of epoch e), AD = space|id|v|e
    invites/<sha256(code)>    a one-time join code's hash, signed by the admin
    joins/<device>            a join request: public keys + the code sealed to the admin
    revocations/<device>/<id> "revoke this device's sessions", signed by the admin
    audit/<device>            the device's last audit head + generation, signed by the device

Rules:
- etcd is trusted for neither confidentiality nor integrity: a record that fails its AEAD,
  signature, or per-entry monotonic version check is refused, listed in `status()`, and the
  last good copy stays in the replica; other records are unaffected.
- A write is an etcd txn comparing the key's mod_revision with the replica's: a concurrent
  edit elsewhere is TRANSACTION_CONFLICT (the replica then holds the winner), never a silent
  overwrite. No quorum → SYNC_UNAVAILABLE; reads keep coming from the replica.
- A device not in the current epoch's member list cannot write (SYNC_NOT_MEMBER), and records
  written under an older epoch's key after the epoch changed are refused.
- Secrets stay sealed on disk: the replica stores etcd's values as they came (ciphertext).
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.core import crypto
from broker.core.sync_etcd import (
    Compacted,
    EtcdClient,
    KeyValue,
    cmp_mod_revision,
    op_delete,
    op_put,
    op_range,
)
from broker.wire.errors import (
    InvalidParameters,
    SyncNotMember,
    SyncRecordRefused,
    SyncUnavailable,
    TransactionConflict,
)

ROOT = "/apm/v1/"
# etcd's default --max-txn-ops is 128; re-seal batches stay well below it
TXN_CHUNK = 100


def _b(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _ub(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _canon(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def entry_ad(space: str, entry_id: str, version: int, epoch: int) -> bytes:
    return _canon({"ad": "apm.sync.v1.entry", "s": space, "id": entry_id, "v": version, "e": epoch})


def key_ad(space: str, epoch: int, device: str) -> bytes:
    return _canon({"ad": "apm.sync.v1.key", "s": space, "e": epoch, "d": device})


def _signed(doc: dict[str, Any], signer: str, sign_priv: bytearray) -> bytes:
    body = _canon(doc)
    sig = crypto.sign(sign_priv, b"apm.sync.v1.sig\0" + body)
    return _canon({"body": _b(body), "signer": signer, "sig": _b(sig)})


def _verified(raw: bytes, public: bytes) -> dict[str, Any]:
    """The body of a signed record, or ValueError when the signature does not hold."""
    outer = json.loads(raw)
    body = _ub(outer["body"])
    if not crypto.verify(public, _ub(outer["sig"]), b"apm.sync.v1.sig\0" + body):
        raise ValueError("bad signature")
    doc: dict[str, Any] = json.loads(body)
    return doc


@dataclass
class Device:
    """This machine's identity in synced spaces; the private halves belong in the vault."""

    id: str
    x_priv: bytearray = field(repr=False)
    sign_priv: bytearray = field(repr=False)

    @classmethod
    def new(cls) -> Device:
        x, s = crypto.device_keypairs()
        return cls("dev-" + secrets.token_hex(6), x, s)

    @property
    def x_pub(self) -> bytes:
        return crypto.x25519_public(self.x_priv)

    @property
    def sign_pub(self) -> bytes:
        return crypto.ed25519_public(self.sign_priv)

    def public_doc(self) -> dict[str, Any]:
        return {"device": self.id, "x": _b(self.x_pub), "ed": _b(self.sign_pub)}


@dataclass(frozen=True)
class JoinCode:
    space: str
    admin: str
    admin_x: bytes
    admin_ed: bytes
    secret: bytes = field(repr=False)
    name: str = ""  # the space's name on the admin's device (the code travels out of band)

    def encode(self) -> str:
        doc = {
            "s": self.space,
            "a": self.admin,
            "x": _b(self.admin_x),
            "ed": _b(self.admin_ed),
            "k": _b(self.secret),
            "n": self.name,
        }
        return "apmjoin1." + _b(_canon(doc))

    @classmethod
    def decode(cls, code: str) -> JoinCode:
        try:
            if not code.startswith("apmjoin1."):
                raise ValueError("prefix")
            doc = json.loads(_ub(code.removeprefix("apmjoin1.")))
            return cls(
                doc["s"], doc["a"], _ub(doc["x"]), _ub(doc["ed"]), _ub(doc["k"]), doc.get("n", "")
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidParameters(
                "the join code is not valid", hint='copy it again from "apm sync invite"'
            ) from exc


class Replica:
    """The local copy of one space's etcd keys (values as stored there: ciphertext), the
    accepted version of every entry, refused records and the last applied revision."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode=WAL;"
            # a cache of etcd (a lost tail is re-read from the cluster): no fsync per commit
            "PRAGMA synchronous=NORMAL;"
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB, mod_rev INTEGER);"
            "CREATE TABLE IF NOT EXISTS accepted (id TEXT PRIMARY KEY, version INTEGER);"
            "CREATE TABLE IF NOT EXISTS refused (key TEXT PRIMARY KEY, reason TEXT,"
            " mod_rev INTEGER);"
            "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);"
        )
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def meta(self, k: str, default: str = "") -> str:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, k: str, v: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (k, v))

    def get(self, key: str) -> tuple[bytes, int] | None:
        row = self._db.execute("SELECT value, mod_rev FROM kv WHERE key=?", (key,)).fetchone()
        return (bytes(row[0]), int(row[1])) if row else None

    def put(self, key: str, value: bytes, mod_rev: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, value, mod_rev))
        self._db.execute("DELETE FROM refused WHERE key=?", (key,))

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key=?", (key,))

    def under(self, prefix: str) -> list[tuple[str, bytes, int]]:
        rows = self._db.execute(
            "SELECT key, value, mod_rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\uffff"),
        )
        return [(str(k), bytes(v), int(r)) for k, v, r in rows]

    def accepted(self, entry_id: str) -> int:
        row = self._db.execute("SELECT version FROM accepted WHERE id=?", (entry_id,)).fetchone()
        return int(row[0]) if row else 0

    def accept(self, entry_id: str, version: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO accepted VALUES (?,?)", (entry_id, version))

    def refuse(self, key: str, reason: str, mod_rev: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO refused VALUES (?,?,?)", (key, reason, mod_rev))

    def refused(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT key, reason, mod_rev FROM refused ORDER BY key")
        return [{"key": k, "reason": r, "mod_revision": m} for k, r, m in rows]

    def refused_revision(self, key: str) -> int:
        row = self._db.execute("SELECT mod_rev FROM refused WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def is_refused(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM refused WHERE key=?", (key,)).fetchone() is not None

    @contextlib.contextmanager
    def batch(self) -> Any:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


class SyncedSpace:
    """One device's view of one synced space: writes through etcd, reads from the replica."""

    def __init__(
        self,
        client: EtcdClient,
        device: Device,
        space: str,
        admin_ed: bytes,
        replica_path: Path,
        on_revocation: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.client = client
        self.device = device
        self.space = space
        self.prefix = f"{ROOT}{space}/"
        self.admin_ed = admin_ed
        self.replica = Replica(replica_path)
        self.on_revocation = on_revocation
        self.on_change: Callable[[list[tuple[str, dict[str, Any] | None]]], None] | None = None
        self._lock = threading.RLock()
        self._keys: dict[int, crypto.Cipher] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_event_at = 0.0
        self.connected = False
        self.resyncs = 0
        self._want_resync = False
        self._applied_changed = threading.Condition(self._lock)

    # -- set-up ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, client: EtcdClient, device: Device, space: str, replica_path: Path
    ) -> SyncedSpace:
        """Make `space` synced with `device` as its first member and admin."""
        s = cls(client, device, space, device.sign_pub, replica_path)
        key = crypto.new_key()
        meta = _signed(
            {"space": space, "admin": device.id, **device.public_doc()}, device.id, device.sign_priv
        )
        ok, _, _ = client.txn(
            [
                {
                    "key": _k64(s.prefix + "meta"),
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": "0",
                }
            ],
            [
                op_put(s.prefix + "meta", meta),
                op_put(s.prefix + f"members/{device.id}", s._member_record(device.public_doc())),
                op_put(s.prefix + "epoch", s._epoch_record(1, [device.id])),
                op_put(
                    s.prefix + f"keys/1/{device.id}",
                    crypto.wrap_to(device.x_pub, key, key_ad(space, 1, device.id)),
                ),
            ],
        )
        crypto.zero(key)
        if not ok:
            raise InvalidParameters(
                "this space is already synced in that cluster",
                hint='join it with "apm sync invite" on a member and "apm sync join"',
            )
        s.resync()
        return s

    def _member_record(self, pub: dict[str, Any]) -> bytes:
        return _signed({**pub, "space": self.space}, self.device.id, self.device.sign_priv)

    def _epoch_record(self, epoch: int, members: list[str]) -> bytes:
        doc = {"space": self.space, "epoch": epoch, "members": sorted(members)}
        return _signed(doc, self.device.id, self.device.sign_priv)

    # -- replication ----------------------------------------------------------------------

    def start(self) -> None:
        """Catch up (resync when never synced or compacted), then follow the watch stream."""
        self._thread = threading.Thread(target=self._run, name=f"sync-{self.space}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.client.cancel_watches()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.replica.close()

    @property
    def applied_revision(self) -> int:
        return int(self.replica.meta("applied", "0"))

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                if self.applied_revision == 0:
                    self.resync()
                self.connected = True
                for batch in self.client.watch(self.prefix, self.applied_revision + 1, self._stop):
                    if batch.events:
                        self._apply_events([(e.kind, e.kv) for e in batch.events])
                    if self._want_resync:
                        self._want_resync = False
                        self.resync()
                    delay = 0.05
            except Compacted:
                self.resync()
            except SyncUnavailable:
                self.connected = False
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
            except Exception:  # the loop must outlive any one bad stream or record
                self.connected = False
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)

    def resync(self) -> None:
        """Read the whole prefix at one revision and make the replica match it."""
        kvs, rev = self.client.range(self.prefix, prefix=True)
        with self._lock:
            present = {kv.key for kv in kvs}
            with self.replica.batch():
                for key, _, mod in self.replica.under(self.prefix):
                    if key in present:
                        continue
                    if "/entries/" in key:
                        # an entry removed without a tombstone: keep ours, say so
                        self.replica.refuse(key, "deleted outside apm (no tombstone)", mod)
                    else:
                        self.replica.delete(key)
            self._apply_events([("put", kv) for kv in kvs], floor=rev)
            self.resyncs += 1

    def _apply_events(
        self, events: list[tuple[str, KeyValue]], floor: int = 0, notify: bool = True
    ) -> list[tuple[str, dict[str, Any] | None]]:
        """Apply etcd changes to the replica; returns (and, with `notify`, hands `on_change`)
        the entries another device changed: (id, plaintext doc, or None when deleted)."""
        # keys and membership first, so entries in the same batch can be opened
        order = sorted(events, key=lambda e: 0 if "/entries/" not in e[1].key else 1)
        changed: list[tuple[str, dict[str, Any] | None]] = []
        with self._lock:
            with self.replica.batch():
                for kind, kv in order:
                    if self._apply_one(kind, kv):
                        eid = kv.key.rsplit("/", 1)[1]
                        doc = self._open(eid, kv.value)
                        changed.append((eid, None if doc.get("deleted") else doc))
                top = max([floor] + [kv.mod_revision for _, kv in events])
                if top > self.applied_revision:
                    self.replica.set_meta("applied", str(top))
            self.last_event_at = time.time()
            self._applied_changed.notify_all()
        if changed and notify and self.on_change is not None:
            self.on_change(changed)
        return changed

    def entries(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Every entry the replica holds and trusts, opened (None: deleted)."""
        out: list[tuple[str, dict[str, Any] | None]] = []
        with self._lock:
            for key, raw, _ in self.replica.under(self.prefix + "entries/"):
                if self.replica.is_refused(key):
                    continue
                eid = key.rsplit("/", 1)[1]
                with contextlib.suppress(SyncNotMember, crypto.DecryptionFailed):
                    doc = self._open(eid, raw)
                    out.append((eid, None if doc.get("deleted") else doc))
        return out

    def _apply_one(self, kind: str, kv: KeyValue) -> bool:
        """True when `kv` is an entry change from elsewhere that was accepted."""
        rel = kv.key.removeprefix(self.prefix)
        if kind == "delete":
            if rel.startswith("entries/"):
                self.replica.refuse(kv.key, "deleted outside apm (no tombstone)", kv.mod_revision)
            else:
                self.replica.delete(kv.key)
                if rel.startswith("members/") or rel == "epoch":
                    self._keys.clear()
            return False
        mine = self.replica.get(kv.key)
        if mine is not None and mine[0] == kv.value:
            # our own commit coming back through the watch, or a resync: already checked (and a
            # revocation already acted on)
            if mine[1] != kv.mod_revision:
                self.replica.put(kv.key, kv.value, kv.mod_revision)
            return False
        try:
            if rel.startswith("entries/"):
                self._check_entry(rel.removeprefix("entries/"), kv)
            elif rel.startswith("keys/"):
                if rel.endswith("/" + self.device.id):
                    # our key for an epoch arrived (approval, re-key): records we could not
                    # open before can be now
                    self._keys.clear()
                    self._want_resync = True
            elif rel.startswith("members/") or rel in ("epoch", "meta"):
                _verified(kv.value, self.admin_ed)
                self._keys.clear()
            elif rel.startswith("revocations/"):
                doc = _verified(kv.value, self.admin_ed)
                if doc.get("device") == self.device.id and self.on_revocation is not None:
                    self.on_revocation(doc)
            elif rel.startswith("audit/"):
                dev = rel.removeprefix("audit/")
                pub = self._member_pub(dev, "ed")
                if pub is None:
                    raise ValueError("audit head of an unknown device")
                _verified(kv.value, pub)
            elif rel.startswith("invites/"):
                _verified(kv.value, self.admin_ed)
        except (ValueError, KeyError, TypeError, crypto.DecryptionFailed) as exc:
            reason = str(exc) if isinstance(exc, _Refused) else _reason(rel, exc)
            self.replica.refuse(kv.key, reason, kv.mod_revision)
            return False
        self.replica.put(kv.key, kv.value, kv.mod_revision)
        return rel.startswith("entries/")

    def _check_entry(self, entry_id: str, kv: KeyValue) -> None:
        rec = json.loads(kv.value)
        version, epoch = int(rec["v"]), int(rec["e"])
        cipher = self._cipher(epoch)
        if cipher is None:
            raise _Refused(f"no key for epoch {epoch} on this device")
        # authenticity first (AD binds space, id, version, epoch), then freshness
        cipher.open(_ub(rec["ct"]), entry_ad(self.space, entry_id, version, epoch))
        have = self.replica.accepted(entry_id)
        if version <= have:
            raise _Refused(f"replayed older version {version} (have {have})")
        current, epoch_rev = self._epoch()
        if epoch < current and kv.mod_revision > epoch_rev:
            raise _Refused(f"written under retired key epoch {epoch} after epoch {current}")
        self.replica.accept(entry_id, version)

    def _member_pub(self, device: str, which: str) -> bytes | None:
        got = self.replica.get(f"{self.prefix}members/{device}")
        if got is None:
            return None
        return _ub(_verified(got[0], self.admin_ed)[which])

    def _epoch(self) -> tuple[int, int]:
        got = self.replica.get(self.prefix + "epoch")
        if got is None:
            return 0, 0
        return int(_verified(got[0], self.admin_ed)["epoch"]), got[1]

    def members(self) -> list[str]:
        got = self.replica.get(self.prefix + "epoch")
        if got is None:
            return []
        return list(_verified(got[0], self.admin_ed)["members"])

    def _cipher(self, epoch: int) -> crypto.Cipher | None:
        if epoch in self._keys:
            return self._keys[epoch]
        got = self.replica.get(f"{self.prefix}keys/{epoch}/{self.device.id}")
        if got is None:
            return None
        key = crypto.unwrap_from(
            self.device.x_priv, got[0], key_ad(self.space, epoch, self.device.id)
        )
        self._keys[epoch] = crypto.Cipher(key)
        crypto.zero(key)
        return self._keys[epoch]

    def wait_applied(self, revision: int, timeout: float = 10.0) -> bool:
        """True once the replica has applied `revision` (bounded wait)."""
        end = time.monotonic() + timeout
        with self._lock:
            while self.applied_revision < revision:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._applied_changed.wait(min(left, 0.2))
        return True

    # -- reads (the replica) --------------------------------------------------------------

    def get(self, entry_id: str) -> dict[str, Any] | None:
        key = f"{self.prefix}entries/{entry_id}"
        with self._lock:
            if self.replica.is_refused(key):
                raise SyncRecordRefused(data={"entry_id": entry_id})
            got = self.replica.get(key)
            if got is None:
                return None
            doc = self._open(entry_id, got[0])
        return None if doc.get("deleted") else doc

    def entry_ids(self) -> list[str]:
        with self._lock:
            rows = self.replica.under(self.prefix + "entries/")
        return [k.rsplit("/", 1)[1] for k, _, _ in rows]

    def _open(self, entry_id: str, raw: bytes) -> dict[str, Any]:
        rec = json.loads(raw)
        version, epoch = int(rec["v"]), int(rec["e"])
        cipher = self._cipher(epoch)
        if cipher is None:
            raise SyncNotMember(data={"space": self.space})
        plain = cipher.open(_ub(rec["ct"]), entry_ad(self.space, entry_id, version, epoch))
        doc: dict[str, Any] = json.loads(plain)
        return doc

    # -- writes (etcd txn is the commit point) --------------------------------------------

    def prepare(self, items: list[tuple[str, dict[str, Any]]]) -> Prepared:
        """Capture what these writes are based on (the preview): each entry's mod_revision and
        version in the replica now. `commit` succeeds only if etcd still has exactly that."""
        with self._lock:
            base = []
            for entry_id, doc in items:
                key = f"{self.prefix}entries/{entry_id}"
                got = self.replica.get(key)
                mod_rev = got[1] if got else 0
                # a refused record in etcd is replaced knowingly: compare against it
                mod_rev = max(mod_rev, self.replica.refused_revision(key))
                base.append((entry_id, doc, mod_rev, self.replica.accepted(entry_id)))
            ep = self.replica.get(self.prefix + "epoch")
            return Prepared(base, ep[1] if ep else 0)

    def put(self, entry_id: str, doc: dict[str, Any]) -> int:
        """Commit `doc` as the entry's next version; returns the etcd revision."""
        return self.commit(self.prepare([(entry_id, doc)]))

    def delete(self, entry_id: str) -> int:
        return self.put(entry_id, {"deleted": True})

    def _writable_epoch(self) -> int:
        epoch, _ = self._epoch()
        if self.device.id not in self.members():
            raise SyncNotMember(data={"space": self.space, "device": self.device.id})
        return epoch

    def commit(self, prepared: Prepared) -> int:
        with self._lock:
            epoch = self._writable_epoch()
            cipher = self._cipher(epoch)
            if cipher is None:
                raise SyncNotMember(data={"space": self.space})
            compares, puts, reads, sealed = [], [], [], []
            for entry_id, doc, mod_rev, base_version in prepared.items:
                key = f"{self.prefix}entries/{entry_id}"
                version = base_version + 1
                ct = cipher.seal(_canon(doc), entry_ad(self.space, entry_id, version, epoch))
                value = _canon({"v": version, "e": epoch, "ct": _b(ct)})
                compares.append(cmp_mod_revision(key, mod_rev))
                puts.append(op_put(key, value))
                reads.append(op_range(key))
                sealed.append((entry_id, key, value, version))
            # the epoch must not have moved under us (a removal re-keys)
            compares.append(cmp_mod_revision(self.prefix + "epoch", prepared.epoch_mod_revision))
            reads.append(op_range(self.prefix + "epoch"))
        ok, responses, rev = self.client.txn(compares, puts, reads)
        with self._lock:
            if not ok:
                fresh = [
                    ("put", KeyValue.from_json(kv))
                    for r in responses
                    for kv in r.get("response_range", {}).get("kvs", [])
                ]
                changed = self._apply_events(fresh, notify=False) if fresh else []
                current = [
                    {"entry_id": eid, "version": self.replica.accepted(eid)} for eid, *_ in sealed
                ]
                conflict = TransactionConflict(
                    "the synced entry changed on another device since this edit was prepared",
                    data={"space": self.space, "current": current},
                )
                # the winners, opened: for the caller's local store, never for the wire
                conflict.fresh = changed  # type: ignore[attr-defined]
                raise conflict
            with self.replica.batch():
                for entry_id, key, value, version in sealed:
                    if version > self.replica.accepted(entry_id):
                        self.replica.accept(entry_id, version)
                        self.replica.put(key, value, rev)
            return rev

    def _put_many(self, items: list[tuple[str, dict[str, Any]]]) -> int:
        return self.commit(self.prepare(items))

    # -- membership -----------------------------------------------------------------------

    def invite(self, name: str = "") -> str:
        """A one-time join code (admin); etcd holds only its hash."""
        secret = crypto.random_bytes(16)
        h = crypto.digest(secret).hex()
        rec = _signed({"invite": h, "space": self.space}, self.device.id, self.device.sign_priv)
        self.client.put(f"{self.prefix}invites/{h}", rec)
        admin = self.device
        return JoinCode(self.space, admin.id, admin.x_pub, admin.sign_pub, secret, name).encode()

    @staticmethod
    def request_join(client: EtcdClient, device: Device, code: str) -> JoinCode:
        """Post this device's join request (its public keys + the code sealed to the admin)."""
        jc = JoinCode.decode(code)
        pub = device.public_doc()
        sealed = crypto.wrap_to(jc.admin_x, bytearray(jc.secret), _canon(pub))
        client.put(f"{ROOT}{jc.space}/joins/{device.id}", _canon({**pub, "code": _b(sealed)}))
        return jc

    def pending_joins(self) -> list[str]:
        rows = self.replica.under(self.prefix + "joins/")
        return [k.rsplit("/", 1)[1] for k, _, _ in rows]

    def approve(self, device_id: str) -> int:
        """Admit a device whose join request carries a valid unused code; wrap the key to it."""
        got = self.client.get(f"{self.prefix}joins/{device_id}")
        if got is None:
            raise InvalidParameters("no join request from that device")
        req = json.loads(got.value)
        pub = {"device": req["device"], "x": req["x"], "ed": req["ed"]}
        try:
            secret = crypto.unwrap_from(self.device.x_priv, _ub(req["code"]), _canon(pub))
        except crypto.DecryptionFailed as exc:
            raise InvalidParameters("the join request was not made with a code of ours") from exc
        invite = f"{self.prefix}invites/{crypto.digest(bytes(secret)).hex()}"
        epoch, _ = self._epoch()
        members = sorted({*self.members(), device_id})
        cipher_key = self._space_key(epoch)
        wrapped = crypto.wrap_to(_ub(req["x"]), cipher_key, key_ad(self.space, epoch, device_id))
        crypto.zero(cipher_key)
        ok, _, rev = self.client.txn(
            [{"key": _k64(invite), "target": "VERSION", "result": "GREATER", "version": "0"}],
            [
                op_delete(invite),
                op_delete(f"{self.prefix}joins/{device_id}"),
                op_put(f"{self.prefix}members/{device_id}", self._member_record(pub)),
                op_put(self.prefix + "epoch", self._epoch_record(epoch, members)),
                op_put(f"{self.prefix}keys/{epoch}/{device_id}", wrapped),
            ],
        )
        if not ok:
            raise InvalidParameters("that join code was already used or never issued")
        self.wait_applied(rev, timeout=5)
        return rev

    def _space_key(self, epoch: int) -> bytearray:
        got = self.replica.get(f"{self.prefix}keys/{epoch}/{self.device.id}")
        if got is None:
            raise SyncNotMember(data={"space": self.space})
        return crypto.unwrap_from(
            self.device.x_priv, got[0], key_ad(self.space, epoch, self.device.id)
        )

    def remove(self, device_id: str) -> int:
        """Drop a member: a new epoch key wrapped to the others, every entry re-sealed."""
        with self._lock:
            epoch, _ = self._epoch()
            members = [m for m in self.members() if m != device_id]
            new_key = crypto.new_key()
            ops = [
                op_delete(f"{self.prefix}members/{device_id}"),
                op_put(self.prefix + "epoch", self._epoch_record(epoch + 1, members)),
            ]
            for m in members:
                x = self._member_pub(m, "x")
                if x is not None:
                    ad = key_ad(self.space, epoch + 1, m)
                    ops.append(
                        op_put(f"{self.prefix}keys/{epoch + 1}/{m}", crypto.wrap_to(x, new_key, ad))
                    )
            crypto.zero(new_key)
            _, _, rev = self.client.txn([], ops)
            self.wait_applied(rev, timeout=5)
            docs = []
            for eid in self.entry_ids():
                got = self.replica.get(f"{self.prefix}entries/{eid}")
                if got is not None and not self.replica.is_refused(f"{self.prefix}entries/{eid}"):
                    docs.append((eid, self._open(eid, got[0])))
            for i in range(0, len(docs), TXN_CHUNK):
                rev = self._put_many(docs[i : i + TXN_CHUNK])
            return rev

    def revoke_sessions(self, device_id: str) -> int:
        rid = secrets.token_hex(6)
        rec = _signed(
            {"device": device_id, "action": "revoke-sessions", "at": int(time.time()), "id": rid},
            self.device.id,
            self.device.sign_priv,
        )
        return self.client.put(f"{self.prefix}revocations/{device_id}/{rid}", rec)

    def publish_audit_head(self, head: str, generation: int) -> int:
        """This device's audit head: the outside anchor for the vault rollback check."""
        rec = _signed(
            {
                "device": self.device.id,
                "head": head,
                "generation": generation,
                "at": int(time.time()),
            },
            self.device.id,
            self.device.sign_priv,
        )
        return self.client.put(f"{self.prefix}audit/{self.device.id}", rec)

    def _pending(self, applied: int) -> int | None:
        try:
            return self.client.count_newer(self.prefix, applied)
        except SyncUnavailable:
            return None

    def published_generation(self) -> int | None:
        """The vault generation this device last announced, read from etcd itself (not the
        replica, which a rollback of this machine's files would roll back too)."""
        kv = self.client.get(f"{self.prefix}audit/{self.device.id}")
        if kv is None:
            return None
        return int(_verified(kv.value, self.device.sign_pub)["generation"])

    def audit_head(self, device_id: str) -> dict[str, Any] | None:
        got = self.replica.get(f"{self.prefix}audit/{device_id}")
        pub = self._member_pub(device_id, "ed")
        if got is None or pub is None:
            return None
        return _verified(got[0], pub)

    # -- status ---------------------------------------------------------------------------

    def status(self, health: bool = True) -> dict[str, Any]:
        with self._lock:
            applied = self.applied_revision
            doc: dict[str, Any] = {
                "space": self.space,
                "device": self.device.id,
                "connected": self.connected,
                "applied_revision": applied,
                "cluster_revision": self.client.last_revision,
                "lag_revisions": max(0, self.client.last_revision - applied),
                "pending_changes": None,
                "last_event_age_s": round(time.time() - self.last_event_at, 3)
                if self.last_event_at
                else None,
                "resyncs": self.resyncs,
                "epoch": self._epoch()[0],
                "members": self.members(),
                "pending_joins": self.pending_joins(),
                "refused": self.replica.refused(),
            }
        if health:  # network calls, outside the lock
            # keys of this space changed in etcd after the replica's revision (None: the
            # cluster cannot say now)
            doc["pending_changes"] = self._pending(applied)
            doc["endpoints"] = self.client.health()
        return doc


@dataclass(frozen=True)
class Prepared:
    """Writes and the replica state they were prepared from: (id, doc, mod_revision,
    version) each, and the epoch record's mod_revision."""

    items: list[tuple[str, dict[str, Any], int, int]]
    epoch_mod_revision: int


class _Refused(ValueError):
    pass


def _reason(rel: str, exc: BaseException) -> str:
    if isinstance(exc, crypto.DecryptionFailed):
        return "failed authentication (tampered, or sealed under another key)"
    if rel.startswith(("members/", "epoch", "meta", "revocations/", "invites/", "audit/")):
        return "signature does not verify (forged or altered)"
    return "malformed record"


def _k64(key: str) -> str:
    return base64.b64encode(key.encode()).decode()
