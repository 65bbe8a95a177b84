"""The audit trail: append-only JSON lines, hash-chained, each record MACed under a vault key.

Each record carries `seq`, `prev` (SHA-256 of the previous line) and `mac` (HMAC-SHA256 under
a key derived with HKDF from the vault's data key). A checkpoint file beside the log holds the
MACed head (seq and hash of the last line), so a truncated log is detected.

Rules:
- A record never holds a secret value, a password or a token; callers pass ids and codes only.
- Fail closed: `append` raises if the record cannot be written, and the caller must refuse the
  operation it records.
- The audit key is derived at unlock and kept until the broker exits, so events while the vault
  is locked (lock, failed unlock) are still authenticated. It is not the vault key and cannot
  be turned back into it. Before the first unlock of a broker's life, records are chained but
  unsigned (`mac: null`); the next signed record's chain covers them.
- Appends are written and flushed but not fsynced (an fsync per read would dominate the cost
  of a call); commits fsync the vault, and the chain makes a lost tail visible.
- The checkpoint follows each record, or, when the broker gives a `defer` hook (the end of
  the transport's receive batch, else its event loop's call_soon), once after each burst of
  records: it then lags the log by one batch or one event-loop turn at most, always in the
  safe direction (a checkpoint behind the log flags nothing). A deferred checkpoint that
  cannot be written refuses the next append, so failing storage still fails closed.
- The log file can be deleted or replaced under a running broker (any same-user process can).
  `check_file` compares the open file with the path (nlink, device and inode): every
  `CHECK_EVERY` records, at most `CHECK_SECONDS` apart while records flow, on the broker's
  reaper timer while idle, and before status, unlock and verify, so the hot path pays one
  monotonic clock read per record. On a mismatch it
  writes the records it still holds open into a fresh file at the path (a replacement is moved
  aside, kept as evidence), appends an `audit.gap` record, and reports it (`incidents`).
- The log is also a journal of what the vault file could lose to a rollback: the newest vault
  generation saved (`vault.saved`) and every session revocation (`session.revoked`). `open`
  collects them while it reads the log anyway; `append` adds new ones (see core/rollback.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from broker.wire import fastjson
from broker.wire.errors import StorageError

from .crypto import hkdf

log = logging.getLogger("apm.broker.audit")

GENESIS = "0" * 64
HEAD_SIZE = 256
_FORBIDDEN_KEYS = frozenset({"password", "token", "value", "secret", "secrets", "new_password"})
_RESERVED_KEYS = frozenset({"seq", "ts", "event", "prev", "mac"})  # the chain's own fields
_REFUSED_KEYS = _FORBIDDEN_KEYS | _RESERVED_KEYS


AUDIT_KEY_INFO = b"apm audit log v1"
CHECK_EVERY = 64  # records between two checks that the log file is still ours
CHECK_SECONDS = 2.0
_COPY_CHUNK = 1 << 20
MAX_INCIDENTS = 20  # kept for status: the newest ones (each is in the broker log too)
# records an incident left in the log: `verify` reports them for as long as they exist, as a
# warning, or, when records were lost for good (the log put back older), as a finding
INCIDENTS = frozenset(
    {"audit.gap", "audit.behind_vault", "vault.rolled_back", "session.pending_mismatch"}
)
_RECORDS_LOST = frozenset({"audit.behind_vault"})


def derive_audit_key(dek: bytearray) -> bytes:
    return hkdf(dek, AUDIT_KEY_INFO)


# one encoder for every record, built once (json.dumps builds a new encoder per call, and
# even JSONEncoder.encode a new C encoder object: a fifth of a seal)
_ENCODE = fastjson.encoder(sort_keys=True, default=str)


def _canonical(doc: dict[str, Any]) -> bytes:
    return _ENCODE(doc).encode()


def _mac(key: bytes, doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "mac"}
    return hmac.digest(key, _canonical(body), "sha256").hex()


class _Hmac:
    """HMAC-SHA256 under one key (RFC 2104) with the key's inner and outer hash states
    computed once: a MAC is then two hash copies, not a key schedule per record (the record and
    the checkpoint are MACed on every tool call). Equal to `hmac.digest(key, msg, "sha256")`
    (tests/test_audit.py compares them)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # SHA-256's block size: a longer key is hashed first
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def hexdigest(self, *parts: bytes | memoryview) -> str:
        """The MAC of the concatenation of `parts`, in hex."""
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


# the last key's states (one audit key per broker; a test's other keys just replace it)
_hmac_for: Callable[[bytes], _Hmac] = functools.lru_cache(maxsize=1)(_Hmac)


# a placeholder for the MAC while a record is serialized, unknown outside this process
_MAC_MARK = os.urandom(16).hex()
_MAC_SLOT = f'"mac":"{_MAC_MARK}"'
_MAC_SLOT_B = _MAC_SLOT.encode()
_COMMA = ord(",")


def _seal(key: bytes | None, doc: dict[str, Any]) -> tuple[str | None, bytes]:
    """The record's MAC and its canonical line (with `mac`), serializing the fields once.

    Same bytes as `_canonical(doc | {"mac": mac})`: the record is serialized once with a
    random placeholder as its `mac`; the MAC is computed over that line without the `mac`
    member (`_canonical` of the fields alone: the bytes before and after it, fed to the MAC
    in two parts), and the placeholder is replaced by it. A JSON string escapes its quotes,
    so the placeholder member appears unescaped only where it was put; if it shows up more
    than once (a field holding it), the fields are serialized apart. The encoder escapes
    every non-ASCII character, so the line's text and its bytes are the same.
    """
    mac, line = _seal_marked(key, {**doc, "mac": _MAC_MARK})
    return mac, line[:-1]


def _seal_marked(key: bytes | None, doc: dict[str, Any]) -> tuple[str | None, bytes]:
    """`_seal` of a record whose `mac` already holds the placeholder (the log builds it so:
    no copy of the record per call); the line comes with its newline."""
    raw = _ENCODE(doc).encode()
    i = raw.find(_MAC_SLOT_B)
    j = i + len(_MAC_SLOT_B)
    if i < 0 or raw.find(_MAC_SLOT_B, j) >= 0:
        mac, line = _seal_apart(key, {k: v for k, v in doc.items() if k != "mac"})
        return mac, line + b"\n"
    if key is None:
        return None, b"".join((raw[:i], b'"mac":null', raw[j:], b"\n"))
    view = memoryview(raw)  # the line without `"mac":…` and the comma that joined it
    if raw[j] == _COMMA:
        mac = _hmac_for(key).hexdigest(view[:i], view[j + 1 :])
    elif raw[i - 1] == _COMMA:
        mac = _hmac_for(key).hexdigest(view[: i - 1], view[j:])
    else:
        mac = _hmac_for(key).hexdigest(view[:i], view[j:])
    return mac, b"".join((raw[:i], b'"mac":"', mac.encode(), b'"', raw[j:], b"\n"))


def _seal_apart(key: bytes | None, doc: dict[str, Any]) -> tuple[str | None, bytes]:
    """`_seal` with the keys sorting before "mac" and those after it serialized separately."""
    lo = _ENCODE({k: v for k, v in doc.items() if k < "mac"})[1:-1]
    hi = _ENCODE({k: v for k, v in doc.items() if k > "mac"})[1:-1]
    mac = None
    if key is not None:
        body = "{" + lo + ("," if lo and hi else "") + hi + "}"
        mac = hmac.digest(key, body.encode(), "sha256").hex()
    mac_json = f'"mac":"{mac}"' if mac is not None else '"mac":null'
    line = "{" + lo + ("," if lo else "") + mac_json + ("," if hi else "") + hi + "}"
    return mac, line.encode()


def _seal_head(key: bytes | None, seq: int, digest: str) -> bytes:
    """`_seal(key, {"seq": seq, "hash": digest})[1]` without the general encoder (the
    checkpoint is rewritten after every burst of records): an int and a hex digest are their
    own canonical JSON."""
    if key is None:
        return f'{{"hash":"{digest}","mac":null,"seq":{int(seq)}}}'.encode()
    mac = _hmac_for(key).hexdigest(f'{{"hash":"{digest}","seq":{int(seq)}}}'.encode())
    return f'{{"hash":"{digest}","mac":"{mac}","seq":{int(seq)}}}'.encode()


@dataclass
class Finding:
    seq: int | None
    line: int
    problem: str
    warning: bool = False  # an incident the log recorded, not damage to the log itself

    def __str__(self) -> str:
        where = f"record {self.seq}" if self.seq is not None else f"line {self.line}"
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class Revocation:
    """One `session.revoked` record: the accessors it revoked, or all sessions created before
    `all_before` (a revocation of every session made while the vault was locked)."""

    seq: int
    accessors: tuple[str, ...] = ()
    all_before: str | None = None


@dataclass
class Journal:
    """What the log says the vault file must hold: its newest generation, every revocation."""

    generation: int = 0  # the newest vault generation a `vault.saved` record names
    generation_seq: int = 0
    generation_ts: str = ""
    revocations: list[Revocation] = field(default_factory=list)
    # tx id -> (seq, "approved"/"denied"/"aborted"): the last decision on each
    # transaction, so an older vault file cannot bring a decided one back (core/transactions)
    tx_decisions: dict[str, tuple[int, str]] = field(default_factory=dict)

    def note(self, doc: dict[str, Any]) -> None:
        event, seq = doc.get("event"), doc.get("seq")
        if not isinstance(seq, int):
            return
        if event == "vault.saved":
            gen = doc.get("generation")
            if isinstance(gen, int) and gen >= self.generation:
                self.generation, self.generation_seq = gen, seq
                ts = str(doc.get("ts", ""))[:32]  # shown at unlock; a forged one holds anything
                self.generation_ts = "".join(c if c.isprintable() else "?" for c in ts)
        elif event in ("session.revoked", "session.revocations_reapplied"):
            target, before = doc.get("target"), doc.get("all_before")
            if isinstance(before, str):
                self.revocations.append(Revocation(seq, all_before=before))
            elif isinstance(target, str) and target and target != "all":
                self.revocations.append(Revocation(seq, tuple(target.split(","))))
        elif event in _TX_DECISIONS:
            tx = doc.get("tx")
            if isinstance(tx, str) and tx:
                self.tx_decisions.pop(tx[:64], None)
                self.tx_decisions[tx[:64]] = (seq, _TX_DECISIONS[str(event)])
                if len(self.tx_decisions) > _TX_DECISIONS_KEPT:  # the oldest: long expired
                    del self.tx_decisions[next(iter(self.tx_decisions))]

    def tx_decisions_after(self, seq: int) -> dict[str, str]:
        return {t: what for t, (s, what) in self.tx_decisions.items() if s > seq}

    def revocations_after(self, seq: int) -> list[Revocation]:
        return [r for r in self.revocations if r.seq > seq]


# (not `tx.commit`: a person's transaction is committed only after its `tx.approved`, and an
# agent's own commits, the frequent ones, have no record a rolled-back file could hold)
_TX_DECISIONS = {
    "tx.approved": "approved",
    "tx.denied": "denied",
    "tx.aborted": "aborted",
    "tx.conflict": "aborted",
}
# a transaction expires 15 minutes after its preview: a rolled-back file's transactions older
# than the newest this many decisions are expired at unlock anyway
_TX_DECISIONS_KEPT = 10_000
_JOURNALED = frozenset(
    {"vault.saved", "session.revoked", "session.revocations_reapplied", *_TX_DECISIONS}
)
_JOURNAL_MARKS = tuple(b'"event":"%s"' % e.encode() for e in sorted(_JOURNALED))


def _utcnow() -> datetime:
    return datetime.now(UTC)


_DEFAULT_CLOCK = _utcnow


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="microseconds")


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _now_iso() -> str:
    """`_iso(datetime.now(UTC))` from one clock read, the date and time formatted once per
    second (a record per tool call: datetime.now().isoformat() was 3% of the broker's time)."""
    sec, ns = divmod(time.time_ns(), 1_000_000_000)
    if _second[0] != sec:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second[0] = sec
    return f"{_second[1]}.{ns // 1000:06d}+00:00"


@dataclass
class AuditLog:
    path: Path
    clock: Callable[[], datetime] = _utcnow
    key: bytes | None = None
    seq: int = 0
    prev: str = GENESIS
    _fh: IO[bytes] | None = None
    _head_fd: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    defer: Callable[[Callable[[], None]], object] | None = None
    _head_due: bool = False  # a deferred checkpoint write is scheduled
    _head_failed: StorageError | None = None
    journal: Journal = field(default_factory=Journal)
    incidents: list[str] = field(default_factory=list)  # noticed by this broker, for status
    _fd: int | None = None  # the open log's descriptor (under `_fh`)
    _file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the open log
    _since_check: int = 0
    _checked_at: float = 0.0

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def open(self) -> None:
        """Resume the chain from the last complete line of an existing log."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        last: bytes | None = None
        if self.path.exists():
            with self.path.open("rb") as f:
                for raw in f:
                    if raw.endswith(b"\n"):
                        last = raw
                        if any(m in raw for m in _JOURNAL_MARKS):
                            with contextlib.suppress(ValueError):
                                doc = json.loads(raw)
                                if isinstance(doc, dict):
                                    self.journal.note(doc)
        if last is not None:
            try:
                doc = json.loads(last)
                self.seq = int(doc["seq"])
                self.prev = hashlib.sha256(last.rstrip(b"\n")).hexdigest()
            except (ValueError, KeyError, TypeError):
                pass  # verify reports it; new records continue after it
        # readable too: if the path is deleted or replaced, the records are copied from here
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._fh = os.fdopen(fd, "ab", buffering=0)
        self._fd = fd
        st = os.fstat(fd)
        self._file_id = (st.st_dev, st.st_ino)
        self._checked_at = time.monotonic()
        self._terminate_torn_tail()

    def _terminate_torn_tail(self) -> None:
        """A crash mid-write may leave a partial last line; end it so new records stay whole."""
        with contextlib.suppress(OSError), self.path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n" and self._fh is not None:
                self._fh.write(b"\n")

    def set_key(self, dek: bytearray) -> None:
        self.key = derive_audit_key(dek)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one record; raises StorageError (and the caller refuses the operation)."""
        if not _REFUSED_KEYS.isdisjoint(fields):  # (one set operation on the hot path)
            for k in fields:
                if k in _FORBIDDEN_KEYS:
                    raise ValueError(f"audit records never hold {k!r}")
                if k in _RESERVED_KEYS:
                    raise ValueError(f"{k!r} is a field of the chain itself")
        with self._lock:
            if self._head_failed is not None:  # refuse until a checkpoint can be written
                self._write_head()
                self._head_failed = None
            self._since_check += 1
            if (
                self._since_check >= CHECK_EVERY
                or time.monotonic() - self._checked_at >= CHECK_SECONDS
            ):
                self._check_file()
            return self._append(event, fields)

    def _append(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Write one record; hold `_lock`."""
        doc: dict[str, Any] = {
            "seq": self.seq + 1,
            "ts": _now_iso() if self.clock is _DEFAULT_CLOCK else _iso(self.clock()),
            "event": event,
        }
        for k, v in fields.items():
            if v is not None:
                doc[k] = v
        doc["prev"] = self.prev
        doc["mac"] = _MAC_MARK  # (replaced by the MAC below: the record is not copied)
        doc["mac"], line = _seal_marked(self.key, doc)
        try:
            if self._fh is None:
                raise OSError("audit log is not open")
            self._fh.write(line)
        except OSError as exc:
            raise StorageError(
                "cannot write the audit log; the operation was refused",
                hint=f"check free space and permissions of {self.path.parent}",
            ) from exc
        self.seq += 1
        self.prev = hashlib.sha256(memoryview(line)[:-1]).hexdigest()
        if event in _JOURNALED:
            self.journal.note(doc)
        if self.defer is None:
            self._write_head()
        elif not self._head_due:
            self._head_due = True
            self.defer(self._deferred_head)
        return doc

    def sync(self) -> None:
        """Make every record written so far durable: the vault is about to record the head,
        and a crash must not leave it pointing past the end of the log."""
        fd = self._fd
        if fd is None:
            return
        try:
            os.fdatasync(fd)
        except OSError as exc:  # the vault then may name a lost record: a warning, not a loss
            log.warning("cannot sync the audit log: %s", exc)

    def head(self) -> tuple[int, str]:
        """The seq and line hash of the newest record (what the vault records at each save)."""
        with self._lock:
            return self.seq, self.prev

    # ------------------------------------------------------------------ deleted or replaced

    def check_file(self) -> str | None:
        """Notice the log (or its checkpoint) deleted or replaced; see `_check_file`."""
        with self._lock:
            return self._check_file()

    def _check_file(self) -> str | None:
        """Is the open file still the one at the path? If not, put the records this broker
        holds open back at the path, then an `audit.gap` record. Returns what happened.
        Hold `_lock`. Raises StorageError (fail closed) if the log cannot be put back."""
        self._since_check = 0
        self._checked_at = time.monotonic()
        if self._fh is None or self._fd is None:
            return None
        try:
            st = os.fstat(self._fd)
            cur: os.stat_result | None = os.lstat(self.path)
        except FileNotFoundError:
            cur = None
        except OSError:
            return None
        if st.st_nlink > 0 and cur is not None and (cur.st_dev, cur.st_ino) == self._file_id:
            self._check_head()
            return None
        reason = "deleted" if cur is None else "replaced"
        try:
            return self._restore(reason, self._fd)
        except OSError as exc:
            log.error("the audit log was %s and cannot be put back: %s", reason, exc)
            raise StorageError(
                f"the audit log was {reason} and cannot be recreated; operations are refused",
                hint=f"check {self.path.parent}, then restart the broker",
            ) from exc

    def _restore(self, reason: str, old: int) -> str:
        stamp = self.clock().strftime("%Y%m%dT%H%M%S.%fZ")
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        aside = None
        if reason == "replaced":  # the replacement is evidence: keep it beside the log
            aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
            os.replace(self.path, aside)
        tmp = self.path.with_name(f".{self.path.name}.restore.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            offset = 0
            while chunk := os.pread(old, _COPY_CHUNK, offset):
                os.write(fd, chunk)
                offset += len(chunk)
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        if self._fh is not None:
            self._fh.close()
        self._fh = os.fdopen(fd, "ab", buffering=0)
        self._fd = fd
        st = os.fstat(fd)
        self._file_id = (st.st_dev, st.st_ino)
        if self._head_fd is not None:  # the checkpoint is rewritten at a fresh file too
            os.close(self._head_fd)
            self._head_fd = None
        restored = self.seq
        gap = self._append(
            "audit.gap",
            {
                "reason": reason,
                "restored_records": restored,
                "restored_bytes": offset,
                "moved_aside": aside.name if aside is not None else None,
            },
        )
        self._write_head()
        note = (
            f"audit log {reason} while the broker ran (noticed at {gap['ts'][:19]}): "
            f"{restored} records restored from the broker's open file, gap record {gap['seq']}"
            + (f"; the replacement was kept as {aside.name}" if aside is not None else "")
        )
        self._incident(note)
        return note

    def _check_head(self) -> None:
        """The checkpoint deleted or replaced: write it afresh at its path, and say so."""
        if self._head_fd is None:
            return
        try:
            st = os.fstat(self._head_fd)
            cur: os.stat_result | None = os.lstat(self.head_path)
        except FileNotFoundError:
            cur = None
        except OSError:
            return
        if (
            st.st_nlink > 0
            and cur is not None
            and (cur.st_dev, cur.st_ino)
            == (
                st.st_dev,
                st.st_ino,
            )
        ):
            return
        os.close(self._head_fd)
        self._head_fd = None
        if cur is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.head_path)
        self._write_head()
        self._incident(f"audit checkpoint {'deleted' if cur is None else 'replaced'}; rewritten")

    def _incident(self, note: str) -> None:
        log.error("%s", note)
        self.incidents = [*self.incidents[-(MAX_INCIDENTS - 1) :], note]

    def _deferred_head(self) -> None:
        with self._lock:
            self._head_due = False
            try:
                self._write_head()
            except StorageError as exc:
                log.error("cannot write the audit checkpoint: %s", exc.message)
                self._head_failed = exc

    def flush(self) -> None:
        """Write a checkpoint still pending (before closing, or before reading the log)."""
        with self._lock:
            if self._head_due:
                self._head_due = False
                self._write_head()

    def _write_head(self) -> None:
        """Rewrite the checkpoint in place: one small pwrite, padded to a fixed size (a temp
        file and rename per record cost ~1 ms of disk wait on every tool call). A torn write
        shows as a checkpoint whose authentication code does not match."""
        data = _seal_head(self.key, self.seq, self.prev).ljust(HEAD_SIZE, b" ")
        try:
            if self._head_fd is None:
                self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._head_fd, data, 0)
        except OSError as exc:
            raise StorageError("cannot write the audit checkpoint") from exc

    def close(self) -> None:
        with contextlib.suppress(StorageError):
            self.flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._fd = None
        if self._head_fd is not None:
            os.close(self._head_fd)
            self._head_fd = None

    # ------------------------------------------------------------------ reading

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            for raw in f:
                with contextlib.suppress(ValueError):
                    doc = json.loads(raw)
                    if isinstance(doc, dict):
                        yield doc

    def verify(self, vault_head: tuple[int, str] | None = None) -> list[Finding]:
        """Every edited, removed, reordered or truncated record, and where; a log shorter
        than, or diverging from, the head the vault recorded at its last save (`vault_head`);
        and, as warnings, the incidents the log recorded."""
        findings: list[Finding] = []
        vseq, vhash = vault_head or (0, GENESIS)
        vault_line_seen = False
        if self.key is None:
            return [Finding(None, 0, "no audit key: unlock the vault first")]
        prev, expected_seq, n = GENESIS, 1, 0
        signed_seen = False
        unsigned_after_signed: list[int] = []  # unsigned records no later signed one covers
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: a torn final write
        for n, raw in enumerate(lines, start=1):
            if not raw:
                continue
            try:
                doc = json.loads(raw)
                seq = int(doc["seq"])
            except (ValueError, KeyError, TypeError):
                # skipped without advancing the chain, as `open` resumes after it
                findings.append(Finding(None, n, "unreadable line (a torn write?)"))
                continue
            if seq != expected_seq:
                if seq > expected_seq:
                    findings.append(Finding(seq, n, f"records {expected_seq}..{seq - 1} removed"))
                else:
                    findings.append(Finding(seq, n, f"out of order (expected {expected_seq})"))
            if doc.get("prev") != prev:
                findings.append(Finding(seq, n, "chain broken: does not follow the record before"))
            mac = doc.get("mac")
            if mac is not None and not hmac.compare_digest(str(mac), _mac(self.key, doc)):
                findings.append(Finding(seq, n, "edited: authentication code does not match"))
            if seq == vseq and not vault_line_seen:
                vault_line_seen = True
                if hashlib.sha256(raw).hexdigest() != vhash:
                    findings.append(Finding(seq, n, _DIVERGES.format(seq=seq)))
            if doc.get("event") in INCIDENTS:
                lost = doc.get("event") in _RECORDS_LOST
                findings.append(Finding(seq, n, incident_text(doc), warning=not lost))
            if mac is None:
                unsigned_after_signed.append(seq)
            else:
                signed_seen = True
                unsigned_after_signed = []  # this signed record's chain covers them
            prev = hashlib.sha256(raw).hexdigest()
            expected_seq = seq + 1
        if tail:
            findings.append(Finding(None, n + 1, "torn last line (a crash while writing)"))
        if unsigned_after_signed:
            # records are signed from a broker's first unlock on, and verify runs unlocked, so
            # an unsigned tail means authentication codes were stripped
            first, last_u = unsigned_after_signed[0], unsigned_after_signed[-1]
            findings.append(
                Finding(
                    first,
                    n,
                    f"records {first}..{last_u} carry no authentication code and "
                    "no signed record follows them",
                )
            )
        if vseq and not vault_line_seen:
            findings.append(Finding(None, n, _SHORTER.format(last=expected_seq - 1, seq=vseq)))
        head = self._read_head()
        if head is None and signed_seen:
            findings.append(
                Finding(
                    None, 0, "the audit checkpoint is missing (truncation could not be checked)"
                )
            )
        if head is not None:
            hseq, hhash = int(head.get("seq", 0)), str(head.get("hash", ""))
            hmac_ok = head.get("mac") is not None and hmac.compare_digest(
                str(head.get("mac")), _mac(self.key, head)
            )
            if not hmac_ok:
                findings.append(Finding(None, 0, "audit checkpoint was edited or is unsigned"))
            elif hseq > expected_seq - 1:
                last = expected_seq - 1
                findings.append(
                    Finding(last or None, n, f"truncated: records {last + 1}..{hseq} are missing")
                )
            elif hseq == expected_seq - 1 and hhash != prev:
                findings.append(Finding(hseq, n, "last record differs from the checkpoint"))
        return findings

    def compare_vault_head(self, vault_head: tuple[int, str]) -> str | None:
        """At unlock: is the record the vault saw last at its last save still in the log?"""
        vseq, vhash = vault_head
        with self._lock:
            seq, prev = self.seq, self.prev
        if vseq == 0:
            return None
        if vseq == seq:
            return None if prev == vhash else _DIVERGES.format(seq=vseq)
        if vseq > seq:
            return _SHORTER.format(last=seq, seq=vseq)
        raw = self._line_at(vseq)
        if raw is None:
            return _SHORTER.format(last=seq, seq=vseq)  # missing from the middle
        return None if hashlib.sha256(raw).hexdigest() == vhash else _DIVERGES.format(seq=vseq)

    def _line_at(self, seq: int) -> bytes | None:
        """The line of record `seq`, read backwards from the end (it is usually near it)."""
        try:
            f = self.path.open("rb")
        except OSError:
            return None
        with f:
            pos = f.seek(0, os.SEEK_END)
            rest = b""
            while pos > 0:
                step = min(1 << 16, pos)
                pos -= step
                f.seek(pos)
                rows = (f.read(step) + rest).split(b"\n")
                rest = rows.pop(0) if pos > 0 else b""
                for raw in reversed(rows):
                    try:
                        found = int(json.loads(raw)["seq"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if found == seq:
                        return raw
                    if found < seq:
                        return None
        return None

    def _read_head(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.head_path.read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None


_SHORTER = (
    "the log ends at record {last}, but the vault recorded record {seq} at its last save: "
    "the audit log was truncated or replaced with an older copy"
)
_DIVERGES = (
    "not the record the vault recorded at its last save: the audit log was replaced with "
    "another copy"
)


def incident_text(raw: dict[str, Any]) -> str:
    """An incident record, for `apm audit verify` and `apm doctor` (a forged record may hold
    anything: its strings lose their control characters and are cut short)."""
    doc = {k: "".join(c if c.isprintable() else "?" for c in str(v)[:300]) for k, v in raw.items()}
    ts, event = doc.get("ts", "")[:19], doc.get("event")
    if event == "audit.gap":
        aside = doc.get("moved_aside")
        return (
            f"the log file was {doc.get('reason')} under the running broker at {ts}; it put back "
            f"{doc.get('restored_records')} records from its open file"
            + (f" and kept the replacement as {aside}" if aside else "")
        )
    if event == "audit.behind_vault":
        return f"at the unlock at {ts}: {doc.get('problem')}"
    if event == "vault.rolled_back":
        return (
            f"at the unlock at {ts}: the vault file was rolled back (generation "
            f"{doc.get('generation')}, the log had recorded {doc.get('recorded')})"
        )
    if event == "session.pending_mismatch":
        return (
            f"at the unlock at {ts}: revocations made while locked were missing from "
            f"pending-revocations.json: {doc.get('target')}"
        )
    return f"{event} at {ts}"
