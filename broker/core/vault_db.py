"""The v2 vault file: one SQLite database (stdlib sqlite3, WAL) of sealed records.

Tables:

    header(key, value)   format "2", vault_id (16 random bytes), kdf (the v1 header JSON:
                         Argon2id profile/params, salt) and keyblock (the DEK wrapped under the
                         password key, AD = `key_ad(vault_id, kdf)`)
    records(kind, id, version, updated_at, ct)
                         one sealed record per row: ct = nonce || AES-256-GCM(DEK) with
                         AD = `record_ad(vault_id, kind, id, version)`

Record kinds: `entry` (an entry's metadata), `secret` (the same entry's secret fields, sealed
apart so listing and search never open them), `state` (generation, spaces, the record digest,
the audit head), `extra` (sessions, requests and other broker state, one row per key) and `tx`
(a transaction awaiting a person, one row per transaction id, its exact arguments included:
core/transactions.py). Beside them, the `snapshot` table's rows (`entries.<i>`) are a cache of every
entry's metadata that unlock checks record by record (vault.py `write_snapshot`); they are in
no commit and no digest. Only kind, id, version and updated_at are in the clear.

Rules:
- This module moves bytes; it never sees a key or a plaintext (vault.py seals and opens).
- A commit is one SQLite transaction: all its rows land, or none (WAL, synchronous=FULL: the
  WAL is fsynced before a commit returns, so an acknowledged write survives power loss too).
- Every SQLite failure becomes an ApmError: STORAGE_ERROR for I/O, full disk or permissions,
  VAULT_CORRUPT for a damaged database. A failed open never writes to the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from broker.wire.errors import (
    AlreadyExists,
    StorageError,
    VaultCorrupt,
    VaultNotFound,
    VaultUnsupportedVersion,
)

SQLITE_MAGIC = b"SQLite format 3\x00"
FORMAT_VERSION = 2
VAULT_ID_BYTES = 16
KEY_AD_PREFIX = b"APMVAULT\x00\x02"

# (kind, id, version, ct)
Row = tuple[str, str, int, bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS header (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    ct BLOB NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
"""

# the sealed metadata snapshot (vault.py `write_snapshot`): a rowid table of its own, because
# SQLite reads a WITHOUT ROWID row's whole payload, overflow pages included, to compare its key:
# megabyte rows in `records` made every commit's lookups beside them read them (+10 ms a commit)
_SNAPSHOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot (
    id TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    ct BLOB NOT NULL
);
"""

# SQLite result codes that mean the database file itself is damaged (anything else that fails
# is the storage: full disk, I/O error, permissions, a lock)
_DAMAGE_CODES = {
    getattr(sqlite3, name)
    for name in ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_FORMAT", "SQLITE_MISMATCH")
    if hasattr(sqlite3, name)
}


def record_ad(vault_id: bytes, kind: str, rid: str, version: int) -> bytes:
    """What a record's AEAD authenticates besides its plaintext: which vault, which row, which
    version. A row moved to another id, kind or vault, or given another version, fails."""
    k, i = kind.encode(), rid.encode()
    return b"".join(
        (b"apm.v2.record", vault_id, struct.pack(">H", len(k)), k, struct.pack(">I", len(i)), i)
    ) + struct.pack(">Q", version)


def record_ad_for(vault_id: bytes, kind: str) -> Callable[[str, int], bytes]:
    """`record_ad` for one vault and kind, as a function of (id, version): what unlock calls
    for every row, with the constant prefix built once."""
    k = kind.encode()
    prefix = b"apm.v2.record" + vault_id + struct.pack(">H", len(k)) + k
    pack_i, pack_q = struct.Struct(">I").pack, struct.Struct(">Q").pack

    def ad(rid: str, version: int) -> bytes:
        i = rid.encode()
        return prefix + pack_i(len(i)) + i + pack_q(version)

    return ad


def key_ad(vault_id: bytes, kdf_json: bytes) -> bytes:
    return KEY_AD_PREFIX + vault_id + kdf_json


def is_v2(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def storage_error(exc: BaseException, what: str) -> Exception:
    """The ApmError an sqlite3 or OS failure stands for."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _DAMAGE_CODES:
        return VaultCorrupt(f"{what}: the vault database is damaged")
    detail = getattr(exc, "sqlite_errorname", None) or getattr(exc, "strerror", None) or exc
    return StorageError(
        f"{what}: {detail}", hint="check free space and permissions of the vault's directory"
    )


class VaultDb:
    """An open v2 vault file. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.Lock()
        head: dict[str, Any] = dict(self._query("SELECT key, value FROM header"))
        try:
            fmt = int(bytes(head["format"]).decode())
            if fmt != FORMAT_VERSION:
                raise VaultUnsupportedVersion(
                    f"vault format version {fmt} is not supported (this apm reads 1 and 2)"
                )
            self.vault_id = bytes(head["vault_id"])
            self.kdf_json = bytes(head["kdf"])
            self.keyblock = bytes(head["keyblock"])
        except (KeyError, ValueError) as exc:
            raise VaultCorrupt("the vault database has no valid header") from exc
        if len(self.vault_id) != VAULT_ID_BYTES:
            raise VaultCorrupt("the vault database has a bad vault id")

    # ------------------------------------------------------------------ open / create

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=32
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA foreign_keys=OFF")
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def create(cls, path: Path, vault_id: bytes, kdf_json: bytes, keyblock: bytes) -> VaultDb:
        """A new, empty v2 vault at `path` (which must not exist), mode 0600."""
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)  # SQLite gives its -wal and -shm files the mode of this file
            conn = cls._connect(path)
            conn.executescript(_SCHEMA)
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO header (key, value) VALUES (?, ?)",
                    [
                        ("format", str(FORMAT_VERSION).encode()),
                        ("vault_id", vault_id),
                        ("kdf", kdf_json),
                        ("keyblock", keyblock),
                    ],
                )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the database file alone opens
        except FileExistsError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(exc, f"could not create {path.name}") from exc
        return cls(path, conn)

    @classmethod
    def open(cls, path: Path) -> VaultDb:
        if not path.exists():
            raise VaultNotFound(f"no vault at {path}")
        if not is_v2(path):
            raise VaultCorrupt(f"{path.name} is not a v2 vault")
        try:
            conn = cls._connect(path)
            try:
                conn.execute("SELECT 1 FROM records LIMIT 1").fetchall()
                return cls(path, conn)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            raise storage_error(exc, f"could not open {path.name}") from exc

    def checkpoint(self) -> None:
        """Fold the WAL into the database file now."""
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise storage_error(exc, f"could not checkpoint {self.path.name}") from exc

    def close(self, *, checkpoint: bool = False) -> None:
        """Close; `checkpoint` first folds the WAL into the database file (the writer's close:
        a reader must not write)."""
        with self._lock:
            if checkpoint:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    # ------------------------------------------------------------------ reading

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise storage_error(exc, f"could not read {self.path.name}") from exc

    def rows(self, kinds: Iterable[str]) -> list[Row]:
        """Every record of the given kinds."""
        out: list[Row] = []
        for kind in kinds:
            out += self._query("SELECT kind, id, version, ct FROM records WHERE kind = ?", (kind,))
        return out

    def iter_rows(self, kind: str, chunk: int) -> Iterator[list[Row]]:
        """Every record of a kind, `chunk` rows at a time (a reader that frees each chunk
        before the next one never holds every ciphertext at once)."""
        with self._lock:
            try:
                cur = self._conn.execute(
                    "SELECT kind, id, version, ct FROM records WHERE kind = ?", (kind,)
                )
            except sqlite3.Error as exc:
                raise storage_error(exc, f"could not read {self.path.name}") from exc
        try:
            while True:
                with self._lock:
                    try:
                        got = cur.fetchmany(chunk)
                    except sqlite3.Error as exc:
                        raise storage_error(exc, f"could not read {self.path.name}") from exc
                if not got:
                    return
                yield got
        finally:
            cur.close()

    def versions(self, kind: str) -> list[tuple[str, int]]:
        """(id, version) of every record of a kind, by id, without their ciphertexts."""
        return self._query("SELECT id, version FROM records WHERE kind = ? ORDER BY id", (kind,))

    def row(self, kind: str, rid: str) -> Row | None:
        got = self._query(
            "SELECT kind, id, version, ct FROM records WHERE kind = ? AND id = ?", (kind, rid)
        )
        return tuple(got[0]) if got else None

    def entry_nonces(self) -> list[tuple[str, int, bytes]]:
        """(id, version, nonce) of every entry record, by id: what tells a snapshot's copy of a
        record from another record of the same id and version (the sealed metadata snapshot)."""
        return self._query(
            "SELECT id, version, substr(ct, 1, 12) FROM records WHERE kind = 'entry' ORDER BY id"
        )

    def rows_by_id(self, kind: str, ids: list[str]) -> list[Row]:
        """The records of a kind with these ids (at most a few hundred at a time)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return self._query(
            f"SELECT kind, id, version, ct FROM records WHERE kind = ? AND id IN ({marks})",  # noqa: S608 (only "?" marks)
            (kind, *ids),
        )

    def _has_snapshot_table(self) -> bool:
        return bool(
            self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshot'")
        )

    def snapshot_versions(self) -> list[tuple[str, str, int]]:
        """("snapshot", id, version) of every snapshot row (none in a vault that never had one)."""
        if not self._has_snapshot_table():
            return []
        return self._query("SELECT 'snapshot', id, version FROM snapshot")

    def snapshot_row(self, rid: str) -> Row | None:
        if not self._has_snapshot_table():
            return None
        got = self._query("SELECT 'snapshot', id, version, ct FROM snapshot WHERE id = ?", (rid,))
        return tuple(got[0]) if got else None

    def put_snapshot(self, rows: list[Row]) -> None:
        """Replace every snapshot row with these (a cache: not part of any commit or digest)."""
        now = int(time.time())
        with self._lock:
            try:
                with _transaction(self._conn):
                    self._conn.execute(_SNAPSHOT_SCHEMA)
                    self._conn.execute("DELETE FROM snapshot")
                    self._conn.executemany(
                        "INSERT INTO snapshot (id, version, updated_at, ct) VALUES (?, ?, ?, ?)",
                        [(i, v, now, ct) for _k, i, v, ct in rows],
                    )
            except sqlite3.Error as exc:
                raise storage_error(exc, f"could not save {self.path.name}") from exc

    def count(self, kind: str) -> int:
        return int(self._query("SELECT count(*) FROM records WHERE kind = ?", (kind,))[0][0])

    # ------------------------------------------------------------------ writing

    def commit(
        self, puts: list[Row], deletes: list[tuple[str, str]], *, expect_generation: int
    ) -> None:
        """Write every row of one vault commit in one transaction, durably, if the vault on
        disk is still at `expect_generation` (the state this process loaded and wrote last):
        a second writer (another process opening the same file) is refused, never merged."""
        now = int(time.time())
        with self._lock:
            try:
                with _transaction(self._conn):
                    got = self._conn.execute(
                        "SELECT version FROM records WHERE kind = 'state' AND id = 'vault'"
                    ).fetchone()
                    if (got[0] if got else 0) != expect_generation:
                        raise StorageError(
                            "the vault file was changed by another process; nothing was saved",
                            hint='run "apm lock" then "apm unlock" to load it again',
                        )
                    if deletes:
                        self._conn.executemany(
                            "DELETE FROM records WHERE kind = ? AND id = ?", deletes
                        )
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO records (kind, id, version, updated_at, ct) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [(k, i, v, now, ct) for k, i, v, ct in puts],
                    )
            except sqlite3.Error as exc:
                raise storage_error(exc, f"could not save {self.path.name}") from exc

    def set_key(self, kdf_json: bytes, keyblock: bytes) -> None:
        """Replace the KDF header and the wrapped DEK (password or profile change)."""
        with self._lock:
            try:
                with _transaction(self._conn):
                    self._conn.executemany(
                        "UPDATE header SET value = ? WHERE key = ?",
                        [(kdf_json, "kdf"), (keyblock, "keyblock")],
                    )
                # the old key wrap may linger in the WAL and in free pages: push it out now
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.execute("VACUUM")
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise storage_error(exc, f"could not save {self.path.name}") from exc
        self.kdf_json, self.keyblock = kdf_json, keyblock

    def backup(self, dest: Path) -> None:
        """A consistent copy of the whole vault at `dest` (mode 0600), taken with SQLite's online
        backup API while the vault stays open; `dest` must not exist."""
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise AlreadyExists(f"{dest} already exists", hint="name a new file") from exc
        except OSError as exc:
            raise storage_error(exc, f"could not write the backup {dest.name}") from exc
        os.close(fd)
        try:
            target = sqlite3.connect(dest, isolation_level=None)
            try:
                with self._lock:
                    self._conn.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                target.close()
            fd = os.open(dest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(OSError):
                dest.unlink()
            raise storage_error(exc, f"could not write the backup {dest.name}") from exc


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
