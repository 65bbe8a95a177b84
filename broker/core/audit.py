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
- The checkpoint follows each record, or, when the broker gives a `defer` hook (its event
  loop's call_soon), once after each burst of records: it then lags the log by one event-loop
  turn at most, always in the safe direction (a checkpoint behind the log flags nothing). A
  deferred checkpoint that cannot be written refuses the next append, so failing storage still
  fails closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from broker.wire.errors import StorageError

from .crypto import hkdf

log = logging.getLogger("apm.broker.audit")

GENESIS = "0" * 64
HEAD_SIZE = 256
_FORBIDDEN_KEYS = frozenset({"password", "token", "value", "secret", "secrets", "new_password"})


AUDIT_KEY_INFO = b"apm audit log v1"


def derive_audit_key(dek: bytearray) -> bytes:
    return hkdf(dek, AUDIT_KEY_INFO)


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def _mac(key: bytes, doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "mac"}
    return hmac.digest(key, _canonical(body), "sha256").hex()


def _seal(key: bytes | None, doc: dict[str, Any]) -> tuple[str | None, bytes]:
    """The record's MAC and its canonical line (with `mac`), serializing the fields once.

    Same bytes as `_canonical(doc | {"mac": mac})`: the keys sorting before "mac" and those
    after it are serialized separately, the MAC is computed over both joined, and the line is
    the two with `"mac":…` between them.
    """
    lo = json.dumps(
        {k: v for k, v in doc.items() if k < "mac"},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )[1:-1]
    hi = json.dumps(
        {k: v for k, v in doc.items() if k > "mac"},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )[1:-1]
    mac = None
    if key is not None:
        body = "{" + lo + ("," if lo and hi else "") + hi + "}"
        mac = hmac.digest(key, body.encode(), "sha256").hex()
    mac_json = f'"mac":"{mac}"' if mac is not None else '"mac":null'
    line = "{" + lo + ("," if lo else "") + mac_json + ("," if hi else "") + hi + "}"
    return mac, line.encode()


@dataclass
class Finding:
    seq: int | None
    line: int
    problem: str

    def __str__(self) -> str:
        where = f"record {self.seq}" if self.seq is not None else f"line {self.line}"
        return f"{where}: {self.problem}"


@dataclass
class AuditLog:
    path: Path
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    key: bytes | None = None
    seq: int = 0
    prev: str = GENESIS
    _fh: IO[bytes] | None = None
    _head_fd: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    defer: Callable[[Callable[[], None]], object] | None = None
    _head_due: bool = False  # a deferred checkpoint write is scheduled
    _head_failed: StorageError | None = None

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
        if last is not None:
            try:
                doc = json.loads(last)
                self.seq = int(doc["seq"])
                self.prev = hashlib.sha256(last.rstrip(b"\n")).hexdigest()
            except (ValueError, KeyError, TypeError):
                pass  # verify reports it; new records continue after it
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fh = os.fdopen(fd, "ab", buffering=0)
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
        for k in fields:
            if k in _FORBIDDEN_KEYS:
                raise ValueError(f"audit records never hold {k!r}")
        with self._lock:
            if self._head_failed is not None:  # refuse until a checkpoint can be written
                self._write_head()
                self._head_failed = None
            doc: dict[str, Any] = {
                "seq": self.seq + 1,
                "ts": self.clock().isoformat(timespec="microseconds"),
                "event": event,
                **{k: v for k, v in fields.items() if v is not None},
                "prev": self.prev,
            }
            doc["mac"], line = _seal(self.key, doc)
            try:
                if self._fh is None:
                    raise OSError("audit log is not open")
                self._fh.write(line + b"\n")
            except OSError as exc:
                raise StorageError(
                    "cannot write the audit log; the operation was refused",
                    hint=f"check free space and permissions of {self.path.parent}",
                ) from exc
            self.seq += 1
            self.prev = hashlib.sha256(line).hexdigest()
            if self.defer is None:
                self._write_head()
            elif not self._head_due:
                self._head_due = True
                self.defer(self._deferred_head)
        return doc

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
        _, data = _seal(self.key, {"seq": self.seq, "hash": self.prev})
        data = data.ljust(HEAD_SIZE, b" ")
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

    def verify(self) -> list[Finding]:
        """Every edited, removed, reordered or truncated record, and where."""
        findings: list[Finding] = []
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

    def _read_head(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.head_path.read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None
