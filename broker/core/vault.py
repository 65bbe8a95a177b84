"""The unlocked vault: entries and spaces in memory, secret values sealed one by one.

Two file formats back it: v2 (vault_db.py, SQLite, one sealed row per entry, written by new
vaults and by every migrated one) and v1 (vault_file.py, one encrypted file rewritten on each
save, apm 0.1.0). A v1 vault is migrated to v2 when it is unlocked; the v1 file is kept beside
it as `<vault>.v1` until `apm vault migrate --finish` or for 30 days.

Rules:
- In memory, only metadata is in the clear; each secret field value stays sealed under the DEK
  (associated data = entry id + field name) until a request that may see it opens it.
- Entries are immutable models: a change builds a new one, so a failed save can restore the
  previous state exactly.
- Every mutation is saved durably before it is acknowledged; if the save fails the in-memory
  state is rolled back and the error is raised.
- A v2 commit writes only what changed: the rows of the entries the mutation touched, the
  extra keys whose JSON changed, and the state row (generation, spaces, record digest). Cost
  does not grow with the vault.
- `extra` values (sessions, requests) are replaced, never edited in place: a commit skips a
  key whose object is the one it saved last.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import fnmatch
import gc
import hashlib
import heapq
import itertools
import json
import marshal
import operator
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import pydantic_core
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from broker.plugin_registry import check_values, entry_type, entry_type_or_none
from broker.wire.entries import (
    DEFAULT_SPACE,
    ENTRY_TYPE_PATTERN,
    ENTRY_TYPES,
    FIELD_NAME_PATTERN,
    EntryMeta,
    EntryType,
    FieldMeta,
)
from broker.wire.errors import (
    AlreadyExists,
    AmbiguousEntry,
    ApmError,
    BadPassword,
    EntryNotFound,
    InvalidParameters,
    SpaceNotEmpty,
    SpaceNotFound,
    VaultCorrupt,
    VaultLocked,
)

from . import crypto, totp, vault_db, vault_file
from .audit import derive_audit_key
from .crypto import Cipher, DecryptionFailed, KdfParams
from .vault_db import VaultDb
from .vault_file import Header

HISTORY_MAX = 10
_LOAD_CHUNK = 1024  # metadata records opened and parsed together at unlock
SNAPSHOT_KIND, SNAPSHOT_ID = "snapshot", "entries"  # the sealed metadata snapshot's row
_SNAPSHOT_FORMAT = 4  # 4: columns sorted by id, taken whole when they match the disk
_SNAPSHOT_CHUNK = 4096  # entries per snapshot row: unlock holds one row's plaintext at a time


class _SnapshotUnusable(Exception):
    """A snapshot row that does not open or belong: unlock starts again without any."""


V1_BACKUP_DAYS = 30
_DIGEST_MOD = 1 << 256
_FIELD_RE = re.compile(FIELD_NAME_PATTERN)
_TYPE_RE = re.compile(ENTRY_TYPE_PATTERN)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


# The entry models are slotted dataclasses, not pydantic models: a vault holds 100k of them
# and their fields, and a pydantic object is a __dict__ per instance (plus a second one for
# each field): ~3 KB an entry, ~300 MiB at 100k, and ~13 objects an entry for the cyclic GC
# to walk. Pydantic still validates and serializes them where they meet JSON (the v1 payload,
# `Payload`), and `model_copy` / `model_dump_json` keep their pydantic meaning.


@dataclass(slots=True)
class HistoryItem:
    sealed: str
    replaced_at: datetime


@dataclass(slots=True)
class StoredField:
    """Never changed in place (a change builds a new one): instances and their `history`
    lists may be shared between entries."""

    secret: bool
    value: str | None = None  # non-secret fields only
    sealed: str | None = None  # secret fields: b64(nonce || ct), AD = id \0 field
    history: list[HistoryItem] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class StoredEntry:
    """One entry as the vault holds it. Never changed in place: an edit stores a new object
    (model_copy), which the search index and the save's per-entry JSON rely on."""

    id: str
    name: str
    type: EntryType
    space: str
    tags: list[str] = field(default_factory=list)
    url: str | None = None
    notes: str | None = None
    fields: dict[str, StoredField] = field(default_factory=dict)
    created_at: datetime
    updated_at: datetime

    def model_copy(self, *, update: dict[str, Any] | None = None) -> StoredEntry:
        """A shallow copy with `update` applied (pydantic's model_copy, without validation)."""
        return dataclasses.replace(self, **(update or {}))

    def model_dump_json(self, **kwargs: Any) -> str:
        return _ENTRY_JSON.dump_json(self, **kwargs).decode()

    def meta(self) -> EntryMeta:
        """The wire view, derived: every field of `EntryMeta` is read from this entry under
        its own name (no field-by-field copy to drift), then `tags` is copied and `fields`
        reshaped (secret values and history never leave). Built from already-validated fields:
        `_construct` skips a second validation (this runs for every entry a tool call or a
        listing returns; tests/test_hot_path.py compares it with model_construct)."""
        values = {name: getattr(self, name) for name in _META_FIELDS}
        values["tags"] = list(self.tags)
        values["fields"] = {
            k: _construct(
                FieldMeta,
                {
                    "secret": f.secret,
                    "value": None if f.secret else f.value,
                    "history": len(f.history),
                },
            )
            for k, f in self.fields.items()
        }
        return _construct(EntryMeta, values)


_M = TypeVar("_M", bound=BaseModel)
# EntryMeta's fields in declaration order: its JSON follows the order of the dict `_construct`
# installs, so `meta` builds its dict in this order
_META_FIELDS: tuple[str, ...] = tuple(EntryMeta.model_fields)
_new = object.__new__
_set = object.__setattr__  # BaseModel.__setattr__ validates and records: bypassed on purpose


def _construct(cls: type[_M], values: dict[str, Any]) -> _M:
    """`cls.model_construct(**values)` for values that name every field, already validated:
    what model_construct ends with, without its per-field loop (half the cost of an entry's
    metadata on a get_entry call; tests/test_hot_path.py compares the two)."""
    obj = _new(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


construct = _construct  # (for models built from values validated by an equal schema)
_ENTRY_JSON: TypeAdapter[StoredEntry] = TypeAdapter(StoredEntry)
# a secret field loaded without its sealed value and with no history: one shared instance
_NO_HISTORY: list[HistoryItem] = []
_LAZY_SECRET = StoredField(secret=True, value=None, sealed=None, history=_NO_HISTORY)


class Payload(BaseModel):
    """What the vault file encrypts. New top-level keys get defaults so old vaults still load."""

    version: int = 1
    spaces: list[str] = Field(default_factory=lambda: [DEFAULT_SPACE])
    entries: list[StoredEntry] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Change:
    """The inputs of an add or edit, after the wire layer validated their shape."""

    fields: dict[str, str]
    secrets: dict[str, str]
    remove_fields: list[str]


@dataclass
class NewEntry:
    """One entry to add (an item of `add_batch`)."""

    type: EntryType
    name: str
    space: str
    tags: list[str]
    url: str | None
    notes: str | None
    change: Change


def _field_ad(entry_id: str, field: str) -> bytes:
    return f"{entry_id}\x00{field}".encode()


def _key(space: str, name: str) -> tuple[str, str]:
    return (space, name.casefold())


class SaveHook(Protocol):
    """Called around every write of the vault file (core/rollback.py: generation + audit head)."""

    def before(self, vault: Vault) -> None: ...
    def after(self, vault: Vault) -> None: ...


class _Missing:
    __slots__ = ()


MISSING: Any = _Missing()


class Entries(dict[str, StoredEntry]):
    """The entries by id. Remembers, for each id changed since the last commit, the entry it
    held before (or MISSING): the commit writes exactly those, and a failed commit puts them
    back, without copying the whole dict."""

    __slots__ = ("undo",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.undo: dict[str, StoredEntry] = {}

    def _touch(self, key: str) -> None:
        if key not in self.undo:
            self.undo[key] = dict.get(self, key, MISSING)

    def __setitem__(self, key: str, value: StoredEntry) -> None:
        self._touch(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._touch(key)
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self._touch(key)
        return super().pop(key, *default)

    def rollback(self) -> None:
        for key, old in self.undo.items():
            if old is MISSING:
                dict.pop(self, key, None)
            else:
                dict.__setitem__(self, key, old)
        self.undo.clear()


@dataclass
class _Saved:
    """What the last v2 commit wrote, to tell what the next one must write."""

    generation: int = 0
    digest: int = 0  # sum of the record hashes of every entry/secret/extra/tx row (mod 2**256)
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)  # entry -> (meta, secret)
    extra: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # key -> (version, json)
    extra_objs: dict[str, object] = field(default_factory=dict)  # key -> the object saved
    txs: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # tx id -> (version, doc)


# the sync layer's pre-commit hook: (vault, [(entry id, before, after)]) for changed entries
# of synced spaces; it raises to refuse the change (TRANSACTION_CONFLICT, SYNC_UNAVAILABLE...)
SyncHook = Callable[["Vault", list[tuple[str, "StoredEntry | None", "StoredEntry | None"]]], None]


class _Heads:
    """The (id, version) of every secret record and, if the vault has snapshot rows, the
    (id, version, nonce) of every entry record, by id: what unlock reads of every record before
    it has the key. Read in a thread started before the Argon2id derivation (SQLite and the
    derivation both release the GIL, so at 100k entries most of the ~0.1 s of reading runs
    beside it); `join` before anything else uses the connection."""

    def __init__(self, db: VaultDb) -> None:
        self._db = db
        self._nonces = bool(db.snapshot_versions())
        self._got: tuple[list[tuple[str, int]], list[tuple[str, int, bytes]] | None] | None = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="vault-heads", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            secrets = self._db.versions("secret")
            self._got = (secrets, self._db.entry_nonces() if self._nonces else None)
        except BaseException as exc:
            self._exc = exc

    def join(self) -> None:
        self._thread.join()

    def _result(
        self,
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int, bytes]] | None]:
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        if self._got is None:
            raise RuntimeError("the record versions were not read")
        return self._got

    def secrets(self) -> list[tuple[str, int]]:
        return self._result()[0]

    def entries(self) -> list[tuple[str, int, bytes]]:
        """Handed over, not kept: the caller frees the list when done with it."""
        secrets, got = self._result()
        self._got = (secrets, None)
        return got if got is not None else self._db.entry_nonces()


class Vault:
    """An open vault. Construct with `create` or `open`; `close` zeroes the key."""

    save_hook: SaveHook | None = None  # set by the broker on the vault it holds

    def __init__(
        self,
        path: Path,
        header: Header,
        keyblock: bytes,
        dek: bytearray,
        payload: Payload,
        clock: Callable[[], datetime] = utcnow,
        *,
        db: VaultDb | None = None,
    ) -> None:
        self.path = path
        self.header = header
        self._header_bytes = vault_file.prefix(header)
        self._keyblock = keyblock
        self._dek = dek
        self._cipher = Cipher(dek)
        self._clock = clock
        self._db = db
        self._saved = _Saved()
        self._snapshot_at = -1  # the generation of the snapshot row read or written last
        # True while the snapshot on disk holds every entry record as it is (none changed since
        # it was written, or read whole at unlock): closing then need not write it again
        self._snapshot_clean = False
        self.audit_head: dict[str, Any] | None = None  # kept in the v2 state row
        self.opened_generation = 0  # the generation the file had when opened (v2)
        self.spaces: list[str] = list(payload.spaces)
        self.extra: dict[str, Any] = dict(payload.extra)
        # transactions that must survive a restart (core/transactions.py), one sealed record
        # of kind `tx` each: id -> the record's JSON (v2 only; a v1 vault keeps none)
        self.tx_docs: dict[str, bytes] = {}
        self._entries = Entries({e.id: e for e in payload.entries})
        self._by_name: dict[tuple[str, str], str] = {}
        # casefolded name -> the id of the one entry of that name, or the ids of several (in
        # different spaces): a list only where needed (100k one-item lists were ~7 MiB)
        self._by_fold: dict[str, str | list[str]] = {}
        self._search: _SearchIndex | None = None
        self._search_stale: dict[str, int] = {}  # id -> change count, changed since the build
        self._changes = 0
        # the change count at the last _reindex (which forgets the stale ids): an index built
        # from entries copied before it cannot be installed
        self._reindexed_at = 0
        self._index_lock = threading.Lock()
        self._closed = False
        self._entry_json: dict[str, tuple[StoredEntry, bytes]] = {}
        # synced spaces (core/sync.py via the server's sync service): a mutation touching one
        # of them is sent through `sync_hook` before it is saved here; the hook raising undoes
        # it. Remote changes the hook learns of on a conflict wait in `_deferred`.
        self.synced_spaces: set[str] = set()
        self.sync_hook: SyncHook | None = None
        self._deferred: list[tuple[str, list[tuple[str, dict[str, Any] | None]]]] = []
        self._reindex()

    @property
    def entries(self) -> Entries:
        return self._entries

    @entries.setter
    def entries(self, value: dict[str, StoredEntry]) -> None:
        old = self._entries
        self._entries = Entries(value)
        self._entries.undo = {k: old.get(k, MISSING) for k in set(old) | set(value)}
        self._reindex()

    @property
    def format(self) -> int:
        return vault_file.FORMAT_VERSION if self._db is None else vault_db.FORMAT_VERSION

    @property
    def generation(self) -> int:
        """Advances with every v2 commit (0 for a v1 vault)."""
        return self._saved.generation

    def record_audit_head(self, head: dict[str, Any]) -> None:
        """Keep the audit log's head (e.g. {"seq": n, "hash": h}) in the vault, durably: in
        v2 the sealed state row, written with the next generation (one row, no entry)."""
        with self.mutation():
            self.audit_head = dict(head)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        path: Path,
        password: bytearray,
        params: KdfParams,
        clock: Callable[[], datetime] = utcnow,
        *,
        format: int = vault_db.FORMAT_VERSION,
    ) -> Vault:
        header = Header(kdf=params, salt=crypto.random_bytes(crypto.SALT_BYTES))
        dek = crypto.new_key()
        if format == vault_file.FORMAT_VERSION:
            keyblock = _wrap(dek, password, header, vault_file.prefix(header))
            vault = cls(path, header, keyblock, dek, Payload(), clock)
            vault.save()
            return vault
        vault_id = crypto.random_bytes(vault_db.VAULT_ID_BYTES)
        kdf_json = header.encode()
        keyblock = _wrap(dek, password, header, vault_db.key_ad(vault_id, kdf_json))
        db = VaultDb.create(path, vault_id, kdf_json, keyblock)
        vault = cls(path, header, keyblock, dek, Payload(), clock, db=db)
        vault.save()
        db.checkpoint()
        return vault

    @classmethod
    def open(
        cls,
        path: Path,
        password: bytearray,
        clock: Callable[[], datetime] = utcnow,
        *,
        migrate: bool = True,
        index: bool = True,
    ) -> Vault:
        """Open either format; a v1 vault is migrated to v2 unless `migrate` is False.
        `index`: start building a v2 vault's search index in a thread now. The broker passes
        False and starts it once the unlock's reply is sent (a CPU-bound thread holds the GIL
        in 5 ms slices, which the unlock's remaining steps on the event loop would wait out)."""
        if vault_db.is_v2(path):
            return cls._open_v2(path, password, clock, index)
        blob = vault_file.read(path)
        kek = crypto.derive_key(password, blob.header.salt, blob.header.kdf)
        try:
            dek = _unwrap_with(kek, blob.keyblock, blob.header_bytes)
            try:
                raw = Cipher(dek).open(blob.payload, blob.payload_ad)
                payload = Payload.model_validate_json(raw)
            except DecryptionFailed as exc:
                crypto.zero(dek)
                raise VaultCorrupt("vault payload failed authentication") from exc
            except ValidationError as exc:
                crypto.zero(dek)
                raise VaultCorrupt("vault payload is unreadable") from exc
            vault_file.remove_stale_temps(path)  # only once the password proved it is ours
            vault = cls(path, blob.header, blob.keyblock, dek, payload, clock)
            if migrate:
                try:
                    vault._migrate(kek)
                except BaseException:
                    vault.close()
                    raise
            return vault
        finally:
            crypto.zero(kek)

    @classmethod
    def _open_v2(
        cls, path: Path, password: bytearray, clock: Callable[[], datetime], index: bool
    ) -> Vault:
        db = VaultDb.open(path)
        heads: _Heads | None = None
        enabled = gc.isenabled()
        gc.disable()  # from the first read on, as in _load_rows
        try:
            heads = _Heads(db)  # read beside the Argon2id derivation (no key needed)
            header = Header.decode(db.kdf_json)
            dek = _unwrap(db.keyblock, password, header, vault_db.key_ad(db.vault_id, db.kdf_json))
            try:
                vault = cls(path, header, db.keyblock, dek, Payload(), clock, db=db)
                vault._load_rows(heads)
            except BaseException:
                crypto.zero(dek)
                raise
        except BaseException:
            if heads is not None:
                heads.join()  # before the connection closes under it
            db.close()
            raise
        finally:
            if enabled:
                gc.enable()
        vault_file.remove_stale_temps(path)
        vault._expire_v1_backup()
        if index:
            vault.build_search_index_in_background()
        return vault

    @staticmethod
    def check_password_on_disk(path: Path, password: bytearray) -> None:
        """Prove the master password against the file without opening the payload."""
        if vault_db.is_v2(path):
            db = VaultDb.open(path)
            try:
                header = Header.decode(db.kdf_json)
                ad = vault_db.key_ad(db.vault_id, db.kdf_json)
                crypto.zero(_unwrap(db.keyblock, password, header, ad))
            finally:
                db.close()
            return
        blob = vault_file.read(path)
        crypto.zero(_unwrap(blob.keyblock, password, blob.header, blob.header_bytes))

    def _key_ad(self) -> bytes:
        if self._db is None:
            return self._header_bytes
        return vault_db.key_ad(self._db.vault_id, self.header.encode())

    def check_password(self, password: bytearray) -> None:
        dek = _unwrap(self._keyblock, password, self.header, self._key_ad())
        crypto.zero(dek)

    def audit_key(self) -> bytes:
        """The audit log's MAC key, derived one-way from the DEK (see core/audit.py)."""
        return derive_audit_key(self._dek)

    def close(self) -> None:
        if self._db is not None and not self._closed:
            self.write_snapshot()
        with self._index_lock:
            self._closed = True
        crypto.zero(self._dek)
        self._cipher.close()
        self._entries = Entries()
        self.tx_docs = {}
        self._by_name = {}
        self._by_fold = {}
        self._search = None
        if self._db is not None:
            self._db.close(checkpoint=True)

    def rewrap(self, password: bytearray, params: KdfParams) -> None:
        """New salt and KEK (password or profile change); the DEK and payload stay the same.

        v1: the backup is replaced too, so no copy on this machine still opens with the old
        password. v2: the old key wrap is pushed out of the WAL and free pages, and a kept v1
        backup (which opens with the old password) is deleted. The DEK is unchanged: copies
        made elsewhere before still open with the old password.
        """
        old = (self.header, self._header_bytes, self._keyblock)
        self.header = Header(kdf=params, salt=crypto.random_bytes(crypto.SALT_BYTES))
        self._header_bytes = vault_file.prefix(self.header)
        self._keyblock = _wrap(self._dek, password, self.header, self._key_ad())
        try:
            if self._db is not None:
                self._db.set_key(self.header.encode(), self._keyblock)
                self.finish_migration()
                return
            if self.save_hook is not None:
                self.save_hook.before(self)
            data = self.encode()
            vault_file.atomic_write(self.path, data)
            vault_file.atomic_write(
                self.path.with_name(self.path.name + ".bak"), data, keep_backup=False
            )
            if self.save_hook is not None:
                self.save_hook.after(self)
        except Exception:
            self.header, self._header_bytes, self._keyblock = old
            raise

    # ------------------------------------------------------------------ v1 (whole file)

    def payload_json(self) -> bytes:
        """The plaintext the v1 vault file encrypts: `Payload` as JSON (UTF-8).

        Each entry's JSON is kept from the save before and reused while the entry object is
        the same (the vault replaces an entry on every change), so a save serializes only
        what changed; pydantic serialization was two thirds of a save at 100k entries. The
        cache holds what the entry objects hold: sealed values, never a plaintext secret."""
        cache: dict[str, tuple[StoredEntry, bytes]] = {}
        old = self._entry_json
        for e in self.entries.values():
            hit = old.get(e.id)
            if hit is None or hit[0] is not e:
                full = self._hydrate(e) if self._db is not None else e
                hit = (e, _ENTRY_JSON.dump_json(full, by_alias=True))
            cache[e.id] = hit
        self._entry_json = cache
        rest = Payload(spaces=self.spaces, extra=self.extra)
        return b"".join(
            (
                b'{"version":%d,"spaces":' % rest.version,
                pydantic_core.to_json(rest.spaces),
                b',"entries":[',
                b",".join([j for _, j in cache.values()]),
                b'],"extra":',
                pydantic_core.to_json(rest.extra),
                b"}",
            )
        )

    def encode(self) -> bytes:
        """The whole vault as a v1 file."""
        payload = self.payload_json()
        ad = self._header_bytes + len(self._keyblock).to_bytes(4, "big") + self._keyblock
        sealed = self._cipher.seal(payload, ad)
        return vault_file.encode(self._header_bytes, self._keyblock, sealed)

    def save(self) -> None:
        """Write what changed since the last save, durably (the save hook around it)."""
        if self.save_hook is not None:
            self.save_hook.before(self)
        if self._db is None:
            vault_file.atomic_write(self.path, self.encode())
        else:
            self._commit_v2()
        self.entries.undo.clear()
        if self.save_hook is not None:
            self.save_hook.after(self)

    @contextlib.contextmanager
    def mutation(self) -> Iterator[None]:
        """Apply a change and save it; on any failure restore the previous state. A closed
        (locked) vault refuses with VAULT_LOCKED: a write that took it before a lock."""
        if self._closed:
            raise VaultLocked("the vault was locked before this change was written")
        spaces, extra, head = list(self.spaces), dict(self.extra), self.audit_head
        tx_docs = dict(self.tx_docs)
        try:
            yield
            if self.sync_hook is not None and self.synced_spaces:
                self._sync_outbound(self.sync_hook)
            self._reindex_touched()
            self.save()
        except BaseException:
            self.entries.rollback()
            self.spaces, self.extra, self.audit_head = spaces, extra, head
            self.tx_docs = tx_docs
            self._reindex()
            self._search = None
            if self._deferred:
                self._apply_deferred()
            raise

    # ------------------------------------------------------------------ synced spaces

    def _sync_outbound(self, hook: SyncHook) -> None:
        changes: list[tuple[str, StoredEntry | None, StoredEntry | None]] = []
        for eid, old in self.entries.undo.items():
            new = dict.get(self.entries, eid)
            was = None if old is MISSING else old
            if new is was:
                continue
            if (was is not None and was.space in self.synced_spaces) or (
                new is not None and new.space in self.synced_spaces
            ):
                changes.append((eid, was, new))
        if changes:
            hook(self, changes)

    def export_entry(self, entry: StoredEntry) -> dict[str, Any]:
        """The entry as a synced record's plaintext (current values; secrets opened): it is
        sealed under the space key before it leaves this process."""
        full = self._hydrate(entry)
        fields = {
            n: {"secret": True, "value": self._open(full.id, n, f.sealed or "")}
            if f.secret
            else {"secret": False, "value": f.value}
            for n, f in full.fields.items()
        }
        return {
            "name": full.name,
            "type": full.type,
            "tags": full.tags,
            "url": full.url,
            "notes": full.notes,
            "fields": fields,
            "created_at": full.created_at.isoformat(),
            "updated_at": full.updated_at.isoformat(),
        }

    def defer_remote(self, space: str, items: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Remote changes to apply right after the current mutation is undone (a conflict)."""
        self._deferred.append((space, items))

    def _apply_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for space, items in deferred:
            self.apply_remote(space, items)

    def apply_remote(self, space: str, items: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Store entries another device committed to the synced `space` (None: removed),
        sealing their secrets under this vault's key. Not sent back through the hook."""
        hook, self.sync_hook = self.sync_hook, None
        try:
            with self.mutation():
                if space not in self.spaces:
                    self.spaces.append(space)
                for eid, doc in items:
                    if doc is None:
                        if eid in self.entries:
                            del self.entries[eid]
                        continue
                    fields = {
                        n: {"secret": True, "sealed": self._seal(eid, n, f["value"])}
                        if f["secret"]
                        else {"secret": False, "value": f["value"]}
                        for n, f in doc["fields"].items()
                    }
                    # another device's record: validated (the entry classes are plain
                    # dataclasses, whose constructor checks nothing)
                    self.entries[eid] = _ENTRY_JSON.validate_python(
                        {
                            "id": eid,
                            "name": doc["name"],
                            "type": doc["type"],
                            "space": space,
                            "tags": doc["tags"],
                            "url": doc["url"],
                            "notes": doc["notes"],
                            "fields": fields,
                            "created_at": datetime.fromisoformat(doc["created_at"]),
                            "updated_at": datetime.fromisoformat(doc["updated_at"]),
                        }
                    )
        finally:
            self.sync_hook = hook

    # ------------------------------------------------------------------ v2 (sealed rows)

    @property
    def _v2(self) -> VaultDb:
        if self._db is None:
            raise RuntimeError("a v1 vault has no records")
        return self._db

    def _seal_row(self, kind: str, rid: str, version: int, doc: bytes) -> vault_db.Row:
        ad = vault_db.record_ad(self._v2.vault_id, kind, rid, version)
        return (kind, rid, version, self._cipher.seal(doc, ad))

    def _open_row(self, row: vault_db.Row) -> bytes:
        kind, rid, version, ct = row
        try:
            return self._cipher.open(
                bytes(ct), vault_db.record_ad(self._v2.vault_id, kind, rid, version)
            )
        except DecryptionFailed as exc:
            raise VaultCorrupt(f"a vault record ({kind}) failed authentication") from exc

    def _row_hash(self, kind: str, rid: str, version: int) -> int:
        ad = vault_db.record_ad(self._v2.vault_id, kind, rid, version)
        return int.from_bytes(hashlib.sha256(ad).digest(), "big")

    def _state_doc(self, generation: int, digest: int) -> bytes:
        return json.dumps(
            {
                "generation": generation,
                "spaces": self.spaces,
                "digest": f"{digest:064x}",
                "audit_head": self.audit_head,
            },
            separators=(",", ":"),
        ).encode()

    def _commit_v2(self) -> None:
        db = self._v2
        saved = self._saved
        gen = saved.generation + 1
        digest = saved.digest
        puts: list[vault_db.Row] = []
        deletes: list[tuple[str, str]] = []
        versions: dict[str, tuple[int, int] | None] = {}
        for eid, old in self.entries.undo.items():
            new = dict.get(self.entries, eid)
            if new is old:
                continue
            was = saved.versions.get(eid)
            if new is None:
                if was is not None:
                    deletes += [("entry", eid), ("secret", eid)]
                    digest -= self._row_hash("entry", eid, was[0])
                    digest -= self._row_hash("secret", eid, was[1])
                    versions[eid] = None
                continue
            meta, secret = _split(new)
            old_meta: bytes = b""
            old_secret: bytes | None = b""
            if was is not None and old is not MISSING:
                old_meta, old_secret = _split(old)
            if secret is None and was is None:
                raise VaultCorrupt("an entry without its secrets cannot be stored anew")
            mv, sv = was if was is not None else (0, 0)
            if meta != old_meta or was is None:
                if was is not None:
                    digest -= self._row_hash("entry", eid, mv)
                mv = gen
                puts.append(self._seal_row("entry", eid, mv, meta))
                digest += self._row_hash("entry", eid, mv)
            if secret is not None and (secret != old_secret or was is None):
                if was is not None:
                    digest -= self._row_hash("secret", eid, sv)
                sv = gen
                puts.append(self._seal_row("secret", eid, sv, secret))
                digest += self._row_hash("secret", eid, sv)
            versions[eid] = (mv, sv)
        extra: dict[str, tuple[int, bytes] | None] = {}
        for key in set(self.extra) | set(saved.extra):
            prev = saved.extra.get(key)
            if key not in self.extra:
                if prev is not None:
                    deletes.append(("extra", key))
                    digest -= self._row_hash("extra", key, prev[0])
                    extra[key] = None
                continue
            if prev is not None and saved.extra_objs.get(key) is self.extra[key]:
                continue  # the same object as last commit: extra values are replaced, not edited
            doc = json.dumps(self.extra[key], separators=(",", ":"), default=str).encode()
            if prev is not None and prev[1] == doc:
                continue
            if prev is not None:
                digest -= self._row_hash("extra", key, prev[0])
            puts.append(self._seal_row("extra", key, gen, doc))
            digest += self._row_hash("extra", key, gen)
            extra[key] = (gen, doc)
        txs: dict[str, tuple[int, bytes] | None] = {}
        for key in set(self.tx_docs) | set(saved.txs):
            prev, tdoc = saved.txs.get(key), self.tx_docs.get(key)
            if prev is not None and (tdoc is None or prev[1] != tdoc):
                digest -= self._row_hash("tx", key, prev[0])
            if tdoc is None:
                if prev is not None:
                    deletes.append(("tx", key))
                    txs[key] = None
            elif prev is None or prev[1] != tdoc:
                puts.append(self._seal_row("tx", key, gen, tdoc))
                digest += self._row_hash("tx", key, gen)
                txs[key] = (gen, tdoc)
        digest %= _DIGEST_MOD
        puts.append(self._seal_row("state", "vault", gen, self._state_doc(gen, digest)))
        db.commit(puts, deletes, expect_generation=saved.generation)
        saved.generation, saved.digest = gen, digest
        if versions:
            self._snapshot_clean = False
        for eid, v in versions.items():
            if v is None:
                saved.versions.pop(eid, None)
            else:
                saved.versions[eid] = v
        for key, x in extra.items():
            if x is None:
                saved.extra.pop(key, None)
            else:
                saved.extra[key] = x
        saved.extra_objs = dict(self.extra)
        for key, t in txs.items():
            if t is None:
                saved.txs.pop(key, None)
            else:
                saved.txs[key] = t

    def _load_rows(self, heads: _Heads | None = None) -> None:
        """Open every row of a v2 vault into memory and check the set against the state row.

        The cyclic garbage collector is paused meanwhile: loading allocates a few objects per
        entry, none of them garbage, and its full passes over a growing heap made unlock at
        100k entries several times slower than at 10k times ten.

        Once loaded, the entries are moved to the collector's permanent generation
        (`gc.freeze`): they hold no reference cycles (they are freed by reference counting when
        replaced or at lock), and without it the first collection after unlock, and every
        full one after that, walked every object of every entry: ~1 s at 100k entries, on
        the event loop, at unlock and again at random later."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            heads = heads or _Heads(self._v2)
            heads.join()  # nothing else reads the connection while its thread does
            self._load_rows_now(heads)
            gc.freeze()
        finally:
            if enabled:
                gc.enable()

    def _load_rows_now(self, heads: _Heads, use_snapshot: bool = True) -> None:
        db = self._v2
        state_row = db.row("state", "vault")
        if state_row is None:
            raise VaultCorrupt("the vault database has no state record")
        try:
            state = json.loads(self._open_row(state_row))
            generation = int(state["generation"])
            spaces = [str(s) for s in state["spaces"]]
            want_digest = int(state["digest"], 16)
            audit_head = state.get("audit_head")
        except (ValueError, KeyError, TypeError) as exc:
            raise VaultCorrupt("the vault state record is unreadable") from exc
        if generation != state_row[2]:
            raise VaultCorrupt("the vault state record has the wrong generation")
        digest = 0
        vid = db.vault_id
        sha = hashlib.sha256
        cipher_open = self._cipher.open
        record_ad = vault_db.record_ad
        secret_versions: dict[str, int] = {}
        try:
            # the sealed snapshot (see `write_snapshot`) stands in for the metadata records
            # it saw unchanged; only the others are read, opened and parsed one by one
            snap_at = self._snapshot_head(generation) if use_snapshot else None
            # secret records are read when a request needs one (`_hydrate`), not at unlock:
            # here only their ids and versions, for the digest
            secret_ad = vault_db.record_ad_for(vid, "secret")
            from_bytes = int.from_bytes
            secret_rows = heads.secrets()
            secret_versions.update(secret_rows)
            n_secrets = len(secret_rows)
            if snap_at is None:
                for rid, version in secret_rows:
                    digest += from_bytes(sha(secret_ad(rid, version)).digest(), "big")
            entries: dict[str, StoredEntry] = {}
            versions: dict[str, tuple[int, int]] = {}
            entry_ad = vault_db.record_ad_for(vid, "entry")
            if snap_at is not None:
                try:
                    snap_digest, todo = self._load_snapshot(
                        heads, snap_at, generation, secret_versions, entries, versions
                    )
                except _SnapshotUnusable:
                    return self._load_rows_now(heads, use_snapshot=False)
                digest += snap_digest
                from_rows = False
                chunks: Iterable[list[vault_db.Row]] = (
                    db.rows_by_id("entry", todo[i : i + _LOAD_CHUNK])
                    for i in range(0, len(todo), _LOAD_CHUNK)
                )
            else:
                chunks, from_rows, todo = db.iter_rows("entry", _LOAD_CHUNK), True, []
            # the metadata records are read, opened (one loop over one AEAD object) and parsed
            # (one json.loads over the chunk's concatenation: each record is one authenticated
            # JSON object, and the count is checked) a chunk at a time: each chunk's
            # ciphertexts and documents are freed as its entries are built, so the next chunk
            # reuses their memory instead of fragmenting the heap (+120 MiB RSS at 100k)
            open_all, loads = self._cipher.open_all, json.loads
            for chunk in chunks:
                ads: list[bytes] = []
                for _, rid, version, _ct in chunk:
                    ad = entry_ad(rid, version)
                    ads.append(ad)
                    if not from_rows:  # counted and checked above, from its version
                        if versions[rid][0] != version:
                            raise VaultCorrupt("a vault entry record changed while loading")
                        continue
                    digest += from_bytes(sha(ad).digest(), "big")
                    sv = secret_versions.pop(rid, None)
                    if sv is None or version > generation or sv > generation:
                        raise VaultCorrupt("a vault entry record has no matching secret record")
                    versions[rid] = (version, sv)
                docs = open_all([r[3] for r in chunk], ads)
                metas = loads(b"".join((b"[", b",".join(docs), b"]")))
                if len(metas) != len(chunk) or not all(type(m) is dict for m in metas):
                    raise VaultCorrupt("a vault entry record is unreadable")
                for (_, rid, _v, _ct), meta in zip(chunk, metas, strict=True):
                    entries[rid] = _join(rid, meta, None)
            extra: dict[str, Any] = {}
            saved_extra: dict[str, tuple[int, bytes]] = {}
            for kind, rid, version, ct in db.rows(("extra",)):
                ad = record_ad(vid, kind, rid, version)
                raw = cipher_open(ct, ad)
                extra[rid] = json.loads(raw)
                saved_extra[rid] = (version, raw)
                digest += int.from_bytes(sha(ad).digest(), "big")
            saved_txs: dict[str, tuple[int, bytes]] = {}
            for kind, rid, version, ct in db.rows(("tx",)):
                ad = record_ad(vid, kind, rid, version)
                saved_txs[rid] = (version, cipher_open(ct, ad))
                digest += int.from_bytes(sha(ad).digest(), "big")
        except DecryptionFailed as exc:
            raise VaultCorrupt("a vault record failed authentication") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise VaultCorrupt("a vault record is unreadable") from exc
        if len(entries) != len(versions):
            raise VaultCorrupt("a vault entry record changed while loading")
        if n_secrets != len(versions):  # each entry has its own: one more is an orphan
            raise VaultCorrupt("a vault secret record has no entry record")
        if digest % _DIGEST_MOD != want_digest:
            raise VaultCorrupt(
                "the vault's records do not match its state record "
                "(a record was removed, added or replaced by an older copy)"
            )
        self.spaces = spaces
        self.extra = extra
        self.audit_head = audit_head if isinstance(audit_head, dict) else None
        self._entries = Entries(entries)
        self._saved = _Saved(
            generation, want_digest, versions, saved_extra, dict(extra), txs=saved_txs
        )
        self.tx_docs = {k: doc for k, (_, doc) in saved_txs.items()}
        self.opened_generation = generation  # before this session's own commits (sync anchor)
        self._reindex()

    # ------------------------------------------------------------------ v2 snapshot

    def _snapshot_head(self, generation: int) -> int | None:
        """The generation of the snapshot rows, if they look usable: all of one generation, not
        newer than the state record's, numbered 0..n-1. (Their content is checked as read.)"""
        heads = self._v2.snapshot_versions()
        if not heads:
            return None
        at = heads[0][2]
        if at > generation or any(v != at for _, _, v in heads):
            return None
        if {rid for _, rid, _ in heads} != {f"{SNAPSHOT_ID}.{i}" for i in range(len(heads))}:
            return None
        return int(at)

    def _load_snapshot(
        self,
        heads: _Heads,
        at: int,
        generation: int,
        secret_versions: dict[str, int],
        entries: dict[str, StoredEntry],
        versions: dict[str, tuple[int, int]],
    ) -> tuple[int, list[str]]:
        """Fill `entries` from the snapshot rows (generation `at`), a row at a time, and
        `versions` from the records on disk. Returns the digest of every entry and secret
        record on disk, and the ids whose metadata record must be read on its own: the
        snapshot's sum over the records it lists, corrected by the hash of every record whose
        version differs from the snapshot's (added if on disk, taken away if only in the
        snapshot): the same sum as hashing every record, without hashing those it saw.

        A row lists its entries sorted by id, as columns (ids, versions, nonces, secret
        versions, metadata), and the records on disk come sorted by id too: when the row's
        (id, version, nonce) list equals the slice of the disk's list starting at its first id,
        and its secret versions equal the disk's (two list comparisons in C), every entry of
        the row is the very record on disk and is taken whole; any other row is checked entry
        by entry. Raises _SnapshotUnusable when a snapshot row does not open or does not belong
        with the others (unlock then starts again without it)."""
        db, vid = self._v2, self._v2.vault_id
        entry_ad = vault_db.record_ad_for(vid, "entry")
        secret_ad = vault_db.record_ad_for(vid, "secret")
        sha, from_bytes = hashlib.sha256, int.from_bytes

        def h(ad: bytes) -> int:
            return from_bytes(sha(ad).digest(), "big")

        disk = heads.entries()  # (id, version, nonce), by id
        disk_ids = [r[0] for r in disk]
        disk_versions = [r[1] for r in disk]
        disk_nonces = [r[2] for r in disk]
        n_disk = len(disk)
        # its tuples freed before the entries are built: 203 -> 200 MiB RSS after an
        # in-process open at 100k (freeing the secret versions' list early too made it 207)
        del disk
        got_svs = list(map(secret_versions.get, disk_ids))
        if None in got_svs:
            raise VaultCorrupt("a vault entry record has no matching secret record")
        disk_svs = cast(list[int], got_svs)
        if n_disk and (max(disk_versions) > generation or max(disk_svs) > generation):
            raise VaultCorrupt("a vault entry record has no matching secret record")
        # `versions` is keyed by the snapshot's id strings where it vouches for a record: the
        # very objects the entries hold (the disk's copies, freed on return, were 8 MiB at 100k)
        n = len(db.snapshot_versions())
        digest, tag, todo, changed, covered = 0, None, [], 0, 0
        whole: list[list[str]] = []  # the ids of the rows taken whole
        seen: list[str] = []  # the ids on disk checked one by one
        by_id: dict[str, tuple[int, bytes, int]] | None = None  # id -> version, nonce, sv
        shared: dict[str | None, StoredField] = {}
        for i in range(n):
            row = db.snapshot_row(f"{SNAPSHOT_ID}.{i}")
            if row is None or row[2] != at:
                raise _SnapshotUnusable
            try:
                raw = self._cipher.open(bytes(row[3]), vault_db.record_ad(vid, *row[:3]))
                # authenticated under the vault key just above: only write_snapshot wrote it
                fmt, got_at, got_tag, index, count, part, ids, mvs, nonces, svs, metas = (
                    marshal.loads(raw)  # noqa: S302
                )
            except (DecryptionFailed, ValueError, EOFError, TypeError) as exc:
                raise _SnapshotUnusable from exc
            del raw
            if (fmt, got_at, index, count) != (_SNAPSHOT_FORMAT, at, i, n) or (
                tag is not None and got_tag != tag
            ):
                raise _SnapshotUnusable
            tag = got_tag
            digest += part
            k = len(ids)
            lo = bisect.bisect_left(disk_ids, ids[0]) if k else 0
            hi = lo + k
            if (  # column slices: no tuple per entry
                disk_ids[lo:hi] == ids
                and disk_versions[lo:hi] == mvs
                and disk_nonces[lo:hi] == nonces
                and disk_svs[lo:hi] == svs
            ):
                _entries_from_snapshot(entries, ids, metas, shared)
                versions.update(zip(ids, zip(mvs, svs, strict=True), strict=True))
                whole.append(ids)
                covered += k
                continue
            if by_id is None:
                by_id = dict(
                    zip(
                        disk_ids,
                        zip(disk_versions, disk_nonces, disk_svs, strict=True),
                        strict=True,
                    )
                )
            for rid, mv, nonce, sv0, meta in zip(ids, mvs, nonces, svs, metas, strict=True):
                got = by_id.get(rid)
                if got is None:  # listed by the snapshot, no longer on disk
                    digest -= h(entry_ad(rid, mv)) + h(secret_ad(rid, sv0))
                    changed += 1
                    continue
                seen.append(rid)
                covered += 1
                version, disk_nonce, sv = got
                versions[rid] = (version, sv)
                if sv0 != sv:
                    digest += h(secret_ad(rid, sv)) - h(secret_ad(rid, sv0))
                    changed += 1
                if mv != version:
                    digest += h(entry_ad(rid, version)) - h(entry_ad(rid, mv))
                    todo.append(rid)
                elif nonce == disk_nonce:  # the very record the snapshot saw
                    _entries_from_snapshot(entries, [rid], [meta], shared)
                else:
                    todo.append(rid)
            del ids, mvs, nonces, svs, metas
        if covered != n_disk:  # some records on disk are not in the snapshot
            known = set(seen).union(*whole)
            for rid, version, sv in zip(disk_ids, disk_versions, disk_svs, strict=True):
                if rid not in known:
                    versions[rid] = (version, sv)
                    digest += h(entry_ad(rid, version)) + h(secret_ad(rid, sv))
                    todo.append(rid)
        self._snapshot_at, self._snapshot_clean = at, not todo and not changed
        return digest, todo

    def write_snapshot(self) -> bool:
        """Seal every entry's metadata, as the records of the current generation hold it, into
        snapshot rows of up to _SNAPSHOT_CHUNK entries each, sorted by id (kind `snapshot`, id
        `entries.<i>`, version = generation, AD = vault id + kind + id + version; all rows
        carry one random tag and their count, so rows of two snapshots never mix), so the next
        unlock opens a few records instead of one per entry. Each entry in it carries its
        records' versions and its metadata record's nonce: unlock uses it only for a record
        still on disk with the same version and nonce (the same sealed row, so the same
        plaintext), and reads any other one on its own. Not part of the state row's digest,
        and never trusted for which records exist. Written when the vault closes; False when
        nothing was written (no commit since the last snapshot, an open mutation, a storage
        error)."""
        db, saved = self._v2, self._saved
        if self.entries.undo or self._snapshot_clean or not saved.versions:
            return False
        if saved.generation == self._snapshot_at:
            return False
        try:
            nonces = {rid: (v, n) for rid, v, n in db.entry_nonces()}
            chunks: list[tuple[int, tuple[list[Any], ...]]] = []
            cols: tuple[list[Any], ...] = ([], [], [], [], [])
            digest = 0
            entry_ad = vault_db.record_ad_for(db.vault_id, "entry")
            secret_ad = vault_db.record_ad_for(db.vault_id, "secret")
            sha, from_bytes = hashlib.sha256, int.from_bytes
            for rid in sorted(saved.versions):
                mv, sv = saved.versions[rid]
                e = dict.get(self.entries, rid)
                got = nonces.get(rid)
                if e is None or got is None or got[0] != mv:
                    continue
                for col, x in zip(cols, (rid, mv, got[1], sv, _to_snapshot(e)), strict=True):
                    col.append(x)
                digest += from_bytes(sha(entry_ad(rid, mv)).digest(), "big") + from_bytes(
                    sha(secret_ad(rid, sv)).digest(), "big"
                )
                if len(cols[0]) >= _SNAPSHOT_CHUNK:
                    chunks.append((digest % _DIGEST_MOD, cols))
                    cols, digest = ([], [], [], [], []), 0
            if cols[0] or not chunks:
                chunks.append((digest % _DIGEST_MOD, cols))
            gen, tag = saved.generation, crypto.random_bytes(16)
            rows = [
                self._seal_row(
                    SNAPSHOT_KIND,
                    f"{SNAPSHOT_ID}.{i}",
                    gen,
                    marshal.dumps((_SNAPSHOT_FORMAT, gen, tag, i, len(chunks), part, *c)),
                )
                for i, (part, c) in enumerate(chunks)
            ]
            db.put_snapshot(rows)
        except ApmError:
            return False
        self._snapshot_at, self._snapshot_clean = gen, True
        return True

    def _migrate(self, kek: bytearray) -> None:
        """Turn this (just opened) v1 vault into v2 at the same path, keeping the v1 file as
        `<vault>.v1`. Crash-safe: the v2 database is complete and closed before it replaces
        the v1 file, so any crash leaves one whole vault at the path (v1 until the rename)."""
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.v2.tmp")
        for leftover in (tmp, *_sidecars(tmp)):
            leftover.unlink(missing_ok=True)
        vault_id = crypto.random_bytes(vault_db.VAULT_ID_BYTES)
        kdf_json = self.header.encode()
        keyblock = Cipher(kek).seal(bytes(self._dek), vault_db.key_ad(vault_id, kdf_json))
        v1_keyblock, v1_saved = self._keyblock, self._saved
        db: VaultDb | None = None
        try:
            db = VaultDb.create(tmp, vault_id, kdf_json, keyblock)
            self._db, self._keyblock, self._saved = db, keyblock, _Saved()
            self.entries.undo = dict.fromkeys(self.entries, MISSING)
            self._commit_v2()
            self.entries.undo.clear()
            db.close(checkpoint=True)
            backup = path.with_name(path.name + ".v1")
            link = path.with_name(f".{path.name}.{os.getpid()}.v1.tmp")
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, backup)
            os.utime(backup)  # the 30 days count from the migration
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            self._db = VaultDb.open(path)
        except BaseException as exc:
            if db is not None:
                with contextlib.suppress(Exception):
                    db.close()
            self._db, self._keyblock, self._saved = None, v1_keyblock, v1_saved
            for leftover in (tmp, *_sidecars(tmp)):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(exc, OSError):
                raise vault_db.storage_error(exc, "could not migrate the vault") from exc
            raise

    def v1_backups(self) -> list[Path]:
        """The v1 files a migration left beside a v2 vault."""
        out = [self.path.with_name(self.path.name + ".v1")]
        bak = self.path.with_name(self.path.name + ".bak")
        if bak.exists() and not vault_db.is_v2(bak):
            out.append(bak)
        return [p for p in out if p.exists()]

    def finish_migration(self) -> list[Path]:
        """Delete the v1 backups of a migrated vault; returns what was deleted."""
        if self._db is None:
            return []
        gone = self.v1_backups()
        for p in gone:
            p.unlink(missing_ok=True)
        if gone:
            _fsync_dir(self.path.parent)
        return gone

    def _expire_v1_backup(self) -> None:
        v1 = self.path.with_name(self.path.name + ".v1")
        with contextlib.suppress(OSError):
            if time.time() - v1.stat().st_mtime > V1_BACKUP_DAYS * 86400:
                self.finish_migration()

    def backup(self, dest: Path) -> None:
        """A consistent copy of the vault at `dest` (v2: SQLite's online backup API)."""
        if self._db is None:
            vault_file.atomic_write(dest, self.encode(), keep_backup=False)
            return
        self._db.backup(dest)

    # ------------------------------------------------------------------ lookups

    def _reindex(self) -> None:
        # inline (space, casefolded name), not _key(): one call less per entry at unlock
        self._by_name = {(e.space, e.name.casefold()): e.id for e in self.entries.values()}
        # most names are in one space only: one comprehension, and the loop only if not
        by_fold: dict[str, str | list[str]] = {f: eid for (_, f), eid in self._by_name.items()}
        if len(by_fold) != len(self._by_name):
            by_fold = {}
            for (_, folded), eid in self._by_name.items():
                _fold_add(by_fold, folded, eid)
        self._by_fold = by_fold
        with self._index_lock:
            self._search = None
            self._search_stale = {}
            self._changes += 1
            self._reindexed_at = self._changes

    def _reindex_touched(self) -> None:
        """Bring the name index up to date with the entries this mutation changed (not a
        rebuild: a commit's cost must not grow with the vault); the search index learns which
        entries it holds an old copy of."""
        by_name, by_fold = self._by_name, self._by_fold
        touched = []
        for eid, old in self.entries.undo.items():
            new = dict.get(self.entries, eid)
            if new is old:
                continue
            if old is not MISSING:
                key = _key(old.space, old.name)
                if by_name.get(key) == eid:
                    del by_name[key]
                _fold_remove(by_fold, key[1], eid)
            if new is not None:
                key = _key(new.space, new.name)
                by_name[key] = eid
                _fold_add(by_fold, key[1], eid)
            touched.append(eid)
        with self._index_lock:
            self._changes += 1
            for eid in touched:
                self._search_stale[eid] = self._changes
            if len(self._search_stale) > max(512, len(self.entries) // 16):
                self._search = None  # the next search rebuilds it, off the event loop

    def build_search_index(self) -> None:
        """Build the search index now, instead of at the first search."""
        self.search_snapshot().ensure_index()

    def build_search_index_in_background(self) -> None:
        """Build the search index in a thread as the vault unlocks (a search that comes first
        builds its own; either way the result is the same). Nothing once the vault is closed."""
        if self._closed:
            return
        threading.Thread(target=self.build_search_index, name="search-index", daemon=True).start()

    def search_snapshot(self) -> SearchSnapshot:
        """What a search needs, taken in O(changes since the index was built): a search then
        runs on this snapshot in any thread while commits go on."""
        with self._index_lock:
            index = self._search
            full = list(self.entries.values()) if index is None else None
            stale = frozenset(self._search_stale) if index is not None else frozenset()
            changed = [e for i in stale if (e := dict.get(self.entries, i)) is not None]
            return SearchSnapshot(self, index, full, stale, changed, self._changes)

    def _install_index(self, index: _SearchIndex, at: int) -> None:
        with self._index_lock:
            if self._search is None and not self._closed and at >= self._reindexed_at:
                self._search = index
                self._search_stale = {i: c for i, c in self._search_stale.items() if c > at}

    def resolve(
        self,
        ref: str,
        space: str | None = None,
        visible: Callable[[StoredEntry], bool] | None = None,
    ) -> StoredEntry:
        """By id, or by name (case-insensitive). Entries `visible` rejects behave as absent."""
        ok = visible or (lambda _e: True)
        entries = self.entries  # (a property: read once, not per match)
        entry = entries.get(ref)
        if entry is not None and (space is None or entry.space == space) and ok(entry):
            return entry
        if space is not None:
            eid = self._by_name.get(_key(space, ref))
            if eid is None or not ok(entries[eid]):
                raise EntryNotFound(data={"space": space})
            return entries[eid]
        folded = ref.casefold()
        got = self._by_fold.get(folded, ())
        ids = (got,) if isinstance(got, str) else got
        matches = [e for i in ids if ok(e := entries[i])]
        if not matches:
            raise EntryNotFound()
        if len(matches) > 1:
            raise AmbiguousEntry(data={"spaces": sorted(m.space for m in matches)})
        return matches[0]

    def iter_entries(
        self,
        space: str | None = None,
        type_: str | None = None,
        tag: str | None = None,
        visible: Callable[[StoredEntry], bool] | None = None,
        among: Iterable[StoredEntry] | None = None,
    ) -> Iterator[StoredEntry]:
        """Entries (of `among`, else all) that pass the filters."""
        for e in self.entries.values() if among is None else among:
            if visible is not None and not visible(e):
                continue
            if space is not None and e.space != space:
                continue
            if type_ is not None and e.type != type_:
                continue
            if tag is not None and tag not in e.tags:
                continue
            yield e

    def search(
        self,
        query: str,
        space: str | None = None,
        type_: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        visible: Callable[[StoredEntry], bool] | None = None,
    ) -> list[tuple[StoredEntry, float]]:
        """Ranked fuzzy match over name, username, url, tags and non-secret notes only."""
        return self.search_snapshot().search(query, space, type_, tag, limit, visible)

    @staticmethod
    def default_field(entry: StoredEntry) -> str:
        """The field `get` opens when none is named: the type's main secret."""
        spec = ENTRY_TYPES.get(entry.type) or entry_type_or_none(entry.type)
        field = (spec.primary if spec is not None else None) or next(
            (k for k, f in entry.fields.items() if f.secret), None
        )
        if field is None:
            raise EntryNotFound("entry has no secret field", data={"entry": entry.id})
        return field

    def reveal(self, entry: StoredEntry, field: str | None) -> tuple[str, str]:
        """Open one secret (or return a plain field's value). Returns (field, value)."""
        if field is None:
            field = self.default_field(entry)
        stored = entry.fields.get(field)
        if stored is None:
            raise EntryNotFound(
                "entry has no such field",
                hint=f'run "apm show {entry.name}" to list its fields',
                data={"field": field},
            )
        if not stored.secret:
            return field, stored.value or ""
        if stored.sealed is None:
            stored = self._hydrate(entry).fields[field]
        return field, self._open(entry.id, field, stored.sealed or "")

    def previous(self, entry: StoredEntry, field: str, version: int) -> str:
        """Open a secret field's value from `version` changes ago (1 = the one before now)."""
        entry = self._hydrate(entry)  # a v2 entry's history is read with its secrets record
        stored = entry.fields.get(field)
        if stored is None or not stored.secret:
            raise EntryNotFound("entry has no such secret field", data={"field": field})
        if not 1 <= version <= len(stored.history):
            raise EntryNotFound(
                "no such previous version",
                hint=f'run "apm history {entry.name}" to list the versions kept',
                data={"field": field, "version": version, "kept": len(stored.history)},
            )
        return self._open(entry.id, field, stored.history[version - 1].sealed)

    def _hydrate(self, entry: StoredEntry) -> StoredEntry:
        """The entry with its secret fields' sealed values and history, read from its secrets
        record if it was loaded without them (the vault's own copy is left as it is)."""
        if not any(_lazy(f) for f in entry.fields.values()):
            return entry
        db = self._v2
        want = self._saved.versions.get(entry.id)
        row = db.row("secret", entry.id)
        if row is None or want is None or row[2] != want[1]:
            raise VaultCorrupt("an entry's secret record is missing or was replaced")
        try:
            secrets = json.loads(self._open_row(row))
            meta = json.loads(_split(entry)[0])
            return _join(entry.id, meta, secrets)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise VaultCorrupt("an entry's secret record is unreadable") from exc

    def _open(self, entry_id: str, field: str, sealed: str) -> str:
        try:
            return self._cipher.open(base64.b64decode(sealed), _field_ad(entry_id, field)).decode()
        except (DecryptionFailed, ValueError) as exc:
            raise VaultCorrupt("a sealed field failed authentication") from exc

    def _seal(self, entry_id: str, field: str, value: str) -> str:
        if self._closed:  # a change that took the vault before a lock (as `mutation`)
            raise VaultLocked("the vault was locked before this change was written")
        blob = self._cipher.seal(value.encode(), _field_ad(entry_id, field))
        return base64.b64encode(blob).decode()

    def totp(self, entry: StoredEntry, now: float | None = None) -> tuple[str, int, int]:
        if entry.type != "totp" and "totp" not in entry.fields:
            raise InvalidParameters("entry has no totp secret", data={"entry": entry.id})
        field = "secret" if entry.type == "totp" else "totp"
        _, seed = self.reveal(entry, field)
        spec = totp.TotpSpec(
            secret=seed,
            digits=int(_plain(entry, "digits") or 6),
            period=int(_plain(entry, "period") or 30),
            algorithm=(_plain(entry, "algorithm") or "SHA1").upper(),
        )
        code, remaining = totp.code(spec, now)
        return code, remaining, spec.period

    # ------------------------------------------------------------------ changes

    def add(
        self,
        type_: EntryType,
        name: str,
        space: str,
        tags: list[str],
        url: str | None,
        notes: str | None,
        change: Change,
    ) -> StoredEntry:
        entry = self._new_entry(NewEntry(type_, name, space, tags, url, notes, change))
        with self.mutation():
            self.entries[entry.id] = entry
        return entry

    def add_batch(
        self, items: list[NewEntry], *, atomic: bool
    ) -> tuple[list[StoredEntry], list[tuple[int, ApmError]]]:
        """Add many entries in one commit. Returns the added entries and, for each item that
        was refused, its index and error. `atomic`: the first refusal refuses the whole batch
        (the error's data names the item's `index`) and nothing is added."""
        added: list[StoredEntry] = []
        refused: list[tuple[int, ApmError]] = []
        taken: set[tuple[str, str]] = set()
        for i, item in enumerate(items):
            try:
                entry = self._new_entry(item, taken)
            except ApmError as exc:
                if atomic:
                    exc.data = {**exc.data, "index": i}
                    raise
                refused.append((i, exc))
                continue
            taken.add(_key(entry.space, entry.name))
            added.append(entry)
        if added:
            with self.mutation():
                for entry in added:
                    self.entries[entry.id] = entry
        return added, refused

    def _new_entry(
        self, item: NewEntry, taken: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()
    ) -> StoredEntry:
        """Validate one new entry against the vault (and `taken`: names a batch adds)."""
        name = _clean_name(item.name, "name")
        space = item.space
        if space not in self.spaces:
            raise SpaceNotFound(
                data={"space": space}, hint=f'create it with "apm space add {space}"'
            )
        if _key(space, name) in self._by_name or _key(space, name) in taken:
            raise AlreadyExists("an entry with this name already exists in the space")
        now = self._clock()
        entry_id = str(uuid.uuid4())
        with _params_named(item.change):
            fields = self._build_fields(entry_id, item.type, {}, item.change)
        spec = entry_type(item.type)
        missing = [f for f in spec.fields if f.required and f.name not in fields]
        if missing:
            raise InvalidParameters(
                "missing required field(s)",
                data={
                    "fields": [f"{'secrets' if f.secret else 'fields'}.{f.name}" for f in missing],
                    "missing": [f.name for f in missing],
                },
                hint="provide them",
            )
        return StoredEntry(
            id=entry_id,
            name=name,
            type=item.type,
            space=space,
            tags=_clean_tags(item.tags, "tags"),
            url=item.url,
            notes=item.notes,
            fields=fields,
            created_at=now,
            updated_at=now,
        )

    def edit(
        self,
        entry: StoredEntry,
        *,
        new_name: str | None,
        move_to: str | None,
        add_tags: list[str],
        remove_tags: list[str],
        url: str | None,
        notes: str | None,
        change: Change,
    ) -> StoredEntry:
        name = _clean_name(new_name, "new_name") if new_name is not None else entry.name
        space = move_to if move_to is not None else entry.space
        if space not in self.spaces:
            raise SpaceNotFound(data={"space": space})
        other = self._by_name.get(_key(space, name))
        if other is not None and other != entry.id:
            raise AlreadyExists("an entry with this name already exists in the space")
        if change.secrets or any(
            f.secret for n, f in entry.fields.items() if n in change.remove_fields
        ):
            entry = self._hydrate(entry)  # the secrets record is rewritten: read it first
        with _params_named(change):
            fields = self._build_fields(entry.id, entry.type, entry.fields, change)
        spec = entry_type(entry.type)
        missing = [f.name for f in spec.fields if f.required and f.name not in fields]
        if missing:
            raise InvalidParameters(
                "cannot remove a required field",
                data={"fields": ["remove_fields"], "missing": missing},
            )
        tags = [t for t in entry.tags if t not in set(remove_tags)]
        tags = _clean_tags(tags + [t for t in add_tags if t not in tags], "add_tags")
        updated = entry.model_copy(
            update={
                "name": name,
                "space": space,
                "tags": tags,
                "url": entry.url if url is None else (url or None),
                "notes": entry.notes if notes is None else (notes or None),
                "fields": fields,
                "updated_at": self._clock(),
            }
        )
        with self.mutation():
            self.entries[entry.id] = updated
        return updated

    def remove(self, entry: StoredEntry) -> None:
        with self.mutation():
            del self.entries[entry.id]

    def _build_fields(
        self,
        entry_id: str,
        type_: str,
        current: dict[str, StoredField],
        change: Change,
    ) -> dict[str, StoredField]:
        spec = entry_type(type_)  # a plugin's type: PLUGIN_UNAVAILABLE unless enabled
        known = {f.name: f for f in spec.fields}
        secrets = dict(change.secrets)
        plain = dict(change.fields)
        for name in list(plain) + list(secrets) + change.remove_fields:
            if not _FIELD_RE.match(name):
                raise InvalidParameters("invalid field name", data={"field": name[:64]})
            if not spec.free_fields and name not in known:
                raise InvalidParameters(
                    f"{type_} entries have no field named {name!r}",
                    hint="fields: " + ", ".join(known),
                    data={"field": name},
                )
        for name in plain:
            if name in known and known[name].secret:
                raise InvalidParameters(
                    f"field {name!r} is secret and cannot be passed as a plain value",
                    hint="secret fields are prompted for, or read with --from-stdin",
                    data={"field": name},
                )
            if name in secrets:
                raise InvalidParameters("field given twice", data={"field": name})
        if type_ == "totp" and "secret" in secrets:
            parsed = totp.parse(secrets["secret"])
            secrets["secret"] = parsed.secret
            for k, v in (
                ("digits", str(parsed.digits)),
                ("period", str(parsed.period)),
                ("algorithm", parsed.algorithm),
                ("issuer", parsed.issuer),
                ("account", parsed.account),
            ):
                if v is not None and k not in plain:
                    plain[k] = v
        if type_ == "totp":
            merged = {k: f.value for k, f in current.items() if not f.secret} | plain
            totp.validate(
                totp.TotpSpec(
                    secret=secrets.get("secret", "A" * 16),
                    digits=_int_field(merged.get("digits"), 6, "digits"),
                    period=_int_field(merged.get("period"), 30, "period"),
                    algorithm=(merged.get("algorithm") or "SHA1").upper(),
                )
            )
        if type_ not in ENTRY_TYPES:  # a plugin's type checks its own values
            kept = {k: f.value or "" for k, f in current.items() if not f.secret}
            check_values(
                type_,
                {k: v for k, v in kept.items() if k not in change.remove_fields} | plain,
                secrets,
            )
        out = dict(current)
        for name in change.remove_fields:
            out.pop(name, None)
        for name, value in plain.items():
            if name in out and out[name].secret:
                raise InvalidParameters("field is secret", data={"field": name})
            out[name] = StoredField(secret=False, value=value)
        now = self._clock()
        for name, value in secrets.items():
            prev = out.get(name)
            history: list[HistoryItem] = []
            if prev is not None and prev.secret and prev.sealed:
                history = [HistoryItem(sealed=prev.sealed, replaced_at=now), *prev.history]
                history = history[:HISTORY_MAX]
            out[name] = StoredField(
                secret=True, sealed=self._seal(entry_id, name, value), history=history
            )
        return out

    # ------------------------------------------------------------------ spaces

    def space_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.spaces, 0)
        for e in self.entries.values():
            counts[e.space] = counts.get(e.space, 0) + 1
        return counts

    def space_add(self, name: str) -> None:
        if name in self.spaces:
            raise AlreadyExists("space already exists", data={"space": name})
        with self.mutation():
            self.spaces.append(name)

    def _not_synced(self, name: str) -> None:
        if name in self.synced_spaces:
            # every device would see its entries deleted: leaving a synced space is a sync
            # operation (the admin removes the device), not a local rename or removal
            raise InvalidParameters(
                "a synced space cannot be renamed or removed here",
                data={"space": name},
                hint='see "apm sync status"; the space\'s admin removes a device with '
                '"apm sync remove"',
            )

    def space_rename(self, name: str, new_name: str) -> int:
        if name not in self.spaces:
            raise SpaceNotFound(data={"space": name})
        self._not_synced(name)
        if new_name in self.spaces:
            raise AlreadyExists("space already exists", data={"space": new_name})
        moved = 0
        with self.mutation():
            self.spaces = [new_name if s == name else s for s in self.spaces]
            for e in list(self.entries.values()):
                if e.space == name:
                    self.entries[e.id] = e.model_copy(update={"space": new_name})
                    moved += 1
        return moved

    def space_remove(self, name: str, force: bool) -> int:
        if name not in self.spaces:
            raise SpaceNotFound(data={"space": name})
        self._not_synced(name)
        doomed = [e.id for e in self.entries.values() if e.space == name]
        if doomed and not force:
            raise SpaceNotEmpty(data={"space": name, "entries": len(doomed)})
        with self.mutation():
            self.spaces = [s for s in self.spaces if s != name]
            for eid in doomed:
                del self.entries[eid]
        return len(doomed)


# ---------------------------------------------------------------------- helpers


def _fold_add(by_fold: dict[str, str | list[str]], folded: str, eid: str) -> None:
    ids = by_fold.get(folded)
    if ids is None:
        by_fold[folded] = eid
    elif isinstance(ids, str):
        if ids != eid:
            by_fold[folded] = [ids, eid]
    elif eid not in ids:
        ids.append(eid)


def _fold_remove(by_fold: dict[str, str | list[str]], folded: str, eid: str) -> None:
    ids = by_fold.get(folded)
    if ids is None:
        return
    if isinstance(ids, str):
        if ids == eid:
            del by_fold[folded]
    elif eid in ids:
        ids.remove(eid)
        if len(ids) == 1:
            by_fold[folded] = ids[0]
        elif not ids:
            del by_fold[folded]


def _wrap(dek: bytearray, password: bytearray, header: Header, ad: bytes) -> bytes:
    kek = crypto.derive_key(password, header.salt, header.kdf)
    try:
        return Cipher(kek).seal(bytes(dek), ad)
    finally:
        crypto.zero(kek)


def _unwrap(keyblock: bytes, password: bytearray, header: Header, ad: bytes) -> bytearray:
    kek = crypto.derive_key(password, header.salt, header.kdf)
    try:
        return _unwrap_with(kek, keyblock, ad)
    finally:
        crypto.zero(kek)


def _unwrap_with(kek: bytearray, keyblock: bytes, ad: bytes) -> bytearray:
    try:
        return bytearray(Cipher(kek).open(keyblock, ad))
    except DecryptionFailed as exc:
        raise BadPassword() from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sidecars(path: Path) -> tuple[Path, Path, Path]:
    return tuple(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))  # type: ignore[return-value]


def _lazy(f: StoredField) -> bool:
    """A secret field loaded without its sealed value (v2 reads secret records on demand)."""
    return f.secret and f.sealed is None


def _split(e: StoredEntry) -> tuple[bytes, bytes | None]:
    """An entry as its two v2 records: metadata (secret fields as a stub with the dates of
    their history, which are not secret) and secrets (each secret field's sealed value and
    history). The secrets record is None when the entry was loaded without its secrets: it
    cannot have changed them, and its record stays as it is."""
    fields: dict[str, Any] = {}
    secrets: dict[str, Any] | None = {}
    for name, f in e.fields.items():
        if f.secret:
            dates = [h.replaced_at.isoformat() for h in f.history]
            fields[name] = {"secret": True, "history": dates}
            if secrets is not None and f.sealed is not None:
                secrets[name] = {
                    "sealed": f.sealed,
                    "history": [h.sealed for h in f.history],
                }
            else:
                secrets = None
        else:
            fields[name] = {"secret": False, "value": f.value}
    meta = {
        "name": e.name,
        "type": e.type,
        "space": e.space,
        "tags": e.tags,
        "url": e.url,
        "notes": e.notes,
        "fields": fields,
        "created_at": e.created_at.isoformat(),
        "updated_at": e.updated_at.isoformat(),
    }
    dumps = json.dumps
    return (
        dumps(meta, separators=(",", ":"), ensure_ascii=False).encode(),
        None if secrets is None else dumps(secrets, separators=(",", ":")).encode(),
    )


def _join(rid: str, meta: dict[str, Any], secrets: dict[str, Any] | None) -> StoredEntry:
    """The entry its v2 records hold; without `secrets`, its secret fields are lazy (no sealed
    value; history items carry their dates only) until `Vault._hydrate` reads that record.
    The records were authenticated under the vault key, so they are trusted as the vault
    wrote them: built without a second validation."""
    fields: dict[str, StoredField] = {}
    fromiso = datetime.fromisoformat
    intern = sys.intern
    for name, f in meta["fields"].items():
        if f["secret"]:
            dates = f["history"]
            if secrets is None and not dates:
                fields[intern(name)] = _LAZY_SECRET
                continue
            s = secrets[name] if secrets is not None else None
            history = [
                HistoryItem(s["history"][i] if s is not None else "", fromiso(d))
                for i, d in enumerate(dates)
            ]
            value = StoredField(True, None, s["sealed"] if s is not None else None, history)
        else:
            value = StoredField(False, f["value"], None, _NO_HISTORY)
        fields[intern(name)] = value
    if meta["type"] not in ENTRY_TYPES and not _TYPE_RE.match(meta["type"]):
        raise VaultCorrupt("a vault entry has an unknown type")  # a plugin's type loads
    return StoredEntry(
        id=rid,
        name=meta["name"],
        type=intern(meta["type"]),
        space=intern(meta["space"]),
        tags=[intern(t) for t in meta["tags"]],
        url=meta["url"],
        notes=meta["notes"],
        fields=fields,
        created_at=fromiso(meta["created_at"]),
        updated_at=fromiso(meta["updated_at"]),
    )


def read_header(path: Path) -> Header:
    """The KDF header of a vault file of either format, without the password."""
    if vault_db.is_v2(path):
        db = VaultDb.open(path)
        try:
            return Header.decode(db.kdf_json)
        finally:
            db.close()
    return vault_file.read(path).header


def _plain(entry: StoredEntry, field: str) -> str | None:
    f = entry.fields.get(field)
    return f.value if f is not None and not f.secret else None


def _int_field(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidParameters(f"{name} must be a number", data={"field": name}) from exc


@contextlib.contextmanager
def _params_named(change: Change) -> Iterator[None]:
    """A refused entry field (`data["field"]`) also names the params path it came in by, in
    `data["fields"]` as a validation error does (`secrets.password`, `fields.digits`), so a
    client or an MCP tool can point at its own argument."""
    try:
        yield
    except InvalidParameters as exc:
        name = exc.data.get("field")
        if "fields" not in exc.data and isinstance(name, str):
            where = (
                f"secrets.{name}"
                if name in change.secrets
                else f"fields.{name}"
                if name in change.fields
                else "remove_fields"
                if name in change.remove_fields
                else None
            )
            if where is not None:
                exc.data["fields"] = [where[:80]]
        raise


def _clean_name(name: str, param: str) -> str:
    """`param`: the params field the name came in (`name`, or `new_name` for an edit)."""
    name = name.strip()
    if not name or any(ord(c) < 32 for c in name):
        raise InvalidParameters(
            "entry name must be non-empty printable text",
            data={"field": "name", "fields": [param]},
        )
    return name


def _clean_tags(tags: list[str], param: str) -> list[str]:
    out: list[str] = []
    for t in tags:
        t = t.strip()
        if not t or len(t) > 64 or any(ord(c) < 32 for c in t):
            raise InvalidParameters("invalid tag", data={"field": "tags", "fields": [param]})
        if t not in out:
            out.append(t)
    return out


_SEP = "\x00"  # never in an entry name (names are printable) nor, checked, in a query


def _to_snapshot(e: StoredEntry) -> tuple[Any, ...]:
    """One entry's metadata in the snapshot: its metadata record's content as plain tuples
    (marshal)."""
    intern = sys.intern
    fields = tuple(
        (
            intern(name),
            f.secret,
            None if f.secret else f.value,
            tuple(h.replaced_at.isoformat() for h in f.history) if f.secret else (),
        )
        for name, f in e.fields.items()
    )
    return (
        e.name,
        intern(e.type),
        intern(e.space),
        tuple(intern(x) for x in e.tags),
        e.url,
        e.notes,
        fields,
        e.created_at.isoformat(),
        # never edited: one datetime for both when loaded (100k entries: -4.8 MiB, -15 ms)
        None if e.updated_at == e.created_at else e.updated_at.isoformat(),
    )


# `_entries_from_snapshot` sets these slots of a bare StoredEntry one by one (4x faster than
# the dataclass's keyword __init__ at 100k entries): it must set every one of them
_ENTRY_SLOTS = (
    "id",
    "name",
    "type",
    "space",
    "tags",
    "url",
    "notes",
    "fields",
    "created_at",
    "updated_at",
)
if tuple(f.name for f in dataclasses.fields(StoredEntry)) != _ENTRY_SLOTS:
    raise RuntimeError("StoredEntry's fields changed: update _entries_from_snapshot")


def _entries_from_snapshot(
    out: dict[str, StoredEntry],
    ids: list[str],
    metas: list[tuple[Any, ...]],
    shared: dict[str | None, StoredField],
) -> None:
    """The entries (secret fields lazy, as `_join` without secrets) the snapshot's metadata
    tuples hold, into `out` by id. Their names, types, spaces and tags were interned when
    written, and marshal interns them again as it loads them (one object per distinct string,
    as `_join` makes). A short non-secret value's field object is shared through `shared`
    (fields are never changed in place): digits, periods, issuers and the like repeat across
    thousands of entries."""
    fromiso, new, entry_cls, field_cls = (
        datetime.fromisoformat,
        object.__new__,
        StoredEntry,
        StoredField,
    )
    lazy, no_history, shared_get = _LAZY_SECRET, _NO_HISTORY, shared.get
    for rid, (name, etype, space, tags, url, notes, raw_fields, created, updated) in zip(
        ids, metas, strict=True
    ):
        fields: dict[str, StoredField] = {}
        for fname, secret, value, dates in raw_fields:
            if not secret:
                f = shared_get(value)
                if f is None:
                    f = field_cls(False, value, None, no_history)
                    if value is None or len(value) <= 16:
                        shared[value] = f
                fields[fname] = f
            elif not dates:
                fields[fname] = lazy
            else:
                fields[fname] = field_cls(
                    True, None, None, [HistoryItem("", fromiso(d)) for d in dates]
                )
        e = new(entry_cls)
        e.id = rid
        e.name = name
        e.type = etype
        e.space = space
        e.tags = list(tags)
        e.url = url
        e.notes = notes
        e.fields = fields
        e.created_at = at = fromiso(created)
        e.updated_at = at if updated is None else fromiso(updated)
        out[rid] = e


def _haystack(e: StoredEntry) -> list[str]:
    """What a search matches besides the name: url, notes, tags and a non-secret username."""
    others = [e.url or "", e.notes or "", *e.tags]
    user = e.fields.get("username") or e.fields.get("user")
    if user is not None and not user.secret and user.value:
        others.append(user.value)
    return others


class _SearchIndex:
    """Every entry's casefolded name, and its other searchable text, in two long strings, so
    the scan for a query runs in C (str.find, one regex) instead of a Python loop over every
    entry; and the entries in the order a search ranks ties, by casefolded name (equal names in
    the vault's order), so a search reads its best hits first and stops after `limit` of them.

    In that order the names that start with the query are one run of neighbours, found by two
    bisections (no scan at all: "github" at 100k entries is 2k such names, which a scan turned
    into a Python loop of 2k steps, ~5 ms); the names equal to the query begin that run. Names
    holding it further in, other text holding it, and names holding it as a subsequence are
    found by scans in that same order, each stopping once the search has enough hits.

    It only finds candidates; `_score` decides, so results are exactly those of a full scan
    (every entry that `_score` accepts contains the query in its name or other text, or has
    it as a subsequence of its name, each of which the index finds). It is built at unlock and
    not rebuilt on each commit: a search skips the index's copies of entries changed since
    (`SearchSnapshot.stale`) and scans their current versions directly; after many changes the
    next search rebuilds it from a snapshot, in its own thread.
    """

    def __init__(self, entries: list[StoredEntry]) -> None:
        # Built in a thread (at unlock, or by a search) a slice of entries at a time, with the
        # GIL given up between slices: one C call over all 100k entries (a sort: 30-45 ms)
        # stalled every other client's call for that long, and a thread running Python holds
        # the GIL for up to the switch interval (5 ms) before a waiting one gets it.
        # The text is read in the vault's order, then reordered: entries visited in name
        # order are scattered in memory, and reading each one's fields that way took 2.5x.
        names: list[str] = []
        hays: list[str] = []
        for lo, hi in _slices(len(entries)):
            part = entries[lo:hi]
            names += [e.name.casefold() for e in part]
            hays += [_SEP.join(t.casefold() for t in _haystack(e)) for e in part]
        order = _name_order(names)
        self.entries: list[StoredEntry] = []
        sorted_names: list[str] = []
        sorted_hays: list[str] = []
        for lo, hi in _slices(len(order)):
            at = order[lo:hi]
            self.entries += [entries[i] for i in at]
            sorted_names += [names[i] for i in at]
            sorted_hays += [hays[i] for i in at]
        del names, hays, order
        self.name_starts = _starts(sorted_names)
        self.hay_starts = _starts(sorted_hays)
        self.names = _joined(sorted_names)
        self.hays = _joined(sorted_hays)
        self.name_bounds = _chunk_bounds(self.names, self.name_starts)
        self.hay_bounds = _chunk_bounds(self.hays, self.hay_starts)

    @staticmethod
    def usable_for(q: str) -> bool:
        return bool(q) and _SEP not in q and not any(c in q for c in "*?[")

    def name_at(self, i: int) -> str:
        """Entry `i`'s casefolded name."""
        return self._at(self.names, self.name_starts, i)

    def hay_at(self, i: int) -> str:
        """Entry `i`'s casefolded other text (url, notes, tags, user), separated."""
        return self._at(self.hays, self.hay_starts, i)

    @staticmethod
    def _at(text: str, starts: list[int], i: int) -> str:
        end = starts[i + 1] - 1 if i + 1 < len(starts) else len(text)
        return text[starts[i] : end]

    def prefixed(self, q: str) -> tuple[int, int]:
        """The run [lo, hi) of the entries whose name starts with `q` (those equal to it first)."""
        k, at = len(q), range(len(self.entries))

        def head(i: int) -> str:
            return self.name_at(i)[:k]  # names are sorted, so their first k characters are too

        lo = bisect.bisect_left(at, q, key=head)
        return lo, bisect.bisect_right(at, q, lo, key=head)

    def ranked(self, q: str) -> Iterator[tuple[float, int]]:
        """(score, position) of every entry the query may match, best first and, within a
        score, by name: the order a search returns them in. Lazy: a search stops reading once
        it has `limit` hits, and the scans behind the later tiers then never run."""
        lo, hi = self.prefixed(q)
        for i in range(lo, hi):
            yield (100.0 if len(self.name_at(i)) == len(q) else 80.0), i
        yield from ((60.0, i) for i in self.inner_name_hits(q, lo, hi))
        yield from ((40.0, i) for i in self.hay_hits(q) if q not in self.name_at(i))
        for i in self.subsequence_hits(q):
            if q not in self.name_at(i) and q not in self.hay_at(i):
                yield 20.0, i

    def inner_name_hits(self, q: str, lo: int, hi: int) -> Iterator[int]:
        """Positions, in order, of the entries outside [lo, hi) (the names that start with
        `q`) with `q` in their name."""
        yield from self._hits(self.names, self.name_starts, self.name_bounds, q, lo, hi)

    def hay_hits(self, q: str) -> Iterator[int]:
        """Positions, in order, of the entries with `q` in their other text."""
        yield from self._hits(self.hays, self.hay_starts, self.hay_bounds, q, 0, 0)

    @staticmethod
    def _hits(
        text: str, starts: list[int], bounds: list[int], q: str, lo: int, hi: int
    ) -> Iterator[int]:
        last = len(starts) - 1
        at = _find(text, bounds, q, 0)
        while at >= 0:
            i = bisect.bisect_right(starts, at) - 1
            if lo <= i < hi:
                i = hi - 1  # skip the run: its names start with q
            else:
                yield i
            if i >= last:
                return
            at = _find(text, bounds, q, starts[i + 1])  # one hit per entry is enough

    def subsequence_hits(self, q: str) -> Iterator[int]:
        """Positions, in order, of the entries whose name holds `q` as a subsequence."""
        if len(q) < 2:
            return
        pattern = _subsequence_pattern(q)
        bounds, starts, seen = self.name_bounds, self.name_starts, -1
        for k in range(len(bounds) - 1):  # a chunk at a time: see _chunk_bounds
            for m in pattern.finditer(self.names, bounds[k], bounds[k + 1]):
                i = bisect.bisect_right(starts, m.start()) - 1
                if i != seen:
                    seen = i
                    yield i


# The search index is built this many entries at a time (~1 ms of work), the GIL given up
# between slices.
_BUILD_SLICE = 2048


def _yield_gil() -> None:
    """Hand the GIL to a thread waiting for it (the event loop's). `time.sleep(0)` does it;
    `os.sched_yield()` and a zero-timeout `select()` release and retake the GIL before the
    waiter wakes (measured: a waiting thread's p50 delay 0.14 ms with sleep(0), 350 ms with
    sched_yield). sleep fails with EINVAL where the clock is interposed — libfaketime with a
    real monotonic clock, as tests/test_real_clients.py runs the broker — and a yield that
    cannot happen is skipped: it never fails a search or an index build."""
    with contextlib.suppress(OSError):
        time.sleep(0)


def _slices(n: int) -> Iterator[tuple[int, int]]:
    """(lo, hi) bounds of `range(n)` a slice at a time; between them the thread sleeps(0),
    which hands the GIL to a thread waiting for it (the event loop) at once."""
    for lo in range(0, n, _BUILD_SLICE):
        yield lo, min(n, lo + _BUILD_SLICE)
        _yield_gil()


def _name_order(names: list[str]) -> list[int]:
    """The positions of `names` in sorted order, equal names in their given order: each slice
    sorted in one C call, then the sorted slices merged (a merge that keeps earlier slices
    first among equals), a slice of output at a time."""
    key = names.__getitem__
    runs = [sorted(range(lo, hi), key=key) for lo, hi in _slices(len(names))]
    merged = heapq.merge(*runs, key=key)
    out: list[int] = []
    for _ in _slices(len(names)):
        out += itertools.islice(merged, _BUILD_SLICE)
    return out


def _starts(texts: list[str]) -> list[int]:
    """Where each of `texts` starts in `_SEP.join(texts)`, a slice at a time (at 100k texts
    one C pass took ~8 ms)."""
    out = [0]
    for lo, hi in _slices(len(texts)):
        sizes = map(operator.add, map(len, texts[lo:hi]), itertools.repeat(1))
        out += itertools.accumulate(sizes, initial=out.pop())
    out.pop()
    return out


def _joined(texts: list[str]) -> str:
    """`_SEP.join(texts)`, a slice at a time (the last join only copies the slices' text)."""
    return _SEP.join([_SEP.join(texts[lo:hi]) for lo, hi in _slices(len(texts))])


def _subsequence_pattern(q: str) -> re.Pattern[str]:
    """A regex that matches where a name holds `q` as a subsequence, never across names: each
    character of `q`, then (possessively: no backtracking) anything up to the next one, as
    `_subsequence` takes the earliest occurrence of each. A lazy `.*?` gap tried every split
    of every name (~80 ms at 100k entries for a long query that has no match)."""
    parts = [re.escape(q[0])]
    for c in q[1:]:
        parts.append(f"[^{_SEP}{re.escape(c)}]*+{re.escape(c)}")
    return re.compile("".join(parts))


# The search index's long strings are scanned a chunk of about this many characters at a time:
# one str.find or regex scan is one C call that holds the GIL throughout (the switch interval
# cannot interrupt it), and over the whole 4.5 MB of a 100k-entry vault's text one took 2-10 ms,
# which a ping on the event loop waited out. Between chunks the event loop gets the GIL back.
_SCAN_CHUNK = 1 << 16


def _chunk_bounds(text: str, starts: list[int]) -> list[int]:
    """Chunk boundaries in `text` (0, ..., len(text)), each the start of an entry, so no match
    (a query never holds the separator, nor does the subsequence pattern's gap) crosses one."""
    bounds = [0]
    while bounds[-1] + _SCAN_CHUNK < len(text):
        i = bisect.bisect_left(starts, bounds[-1] + _SCAN_CHUNK)
        if i >= len(starts):
            break
        bounds.append(starts[i])
    bounds.append(len(text))
    return bounds


def _find(text: str, bounds: list[int], q: str, at: int) -> int:
    """`text.find(q, at)`, a chunk at a time (the GIL is free between chunks)."""
    k = bisect.bisect_right(bounds, at) - 1
    last = len(bounds) - 1
    while k < last:
        hi = bounds[k + 1]
        if at < hi:
            got = text.find(q, at, hi)
            if got >= 0:
                return got
            at = hi
        k += 1
    return -1


@dataclass
class SearchSnapshot:
    """A consistent view for one search: the index, the ids it holds stale copies of, and the
    current versions of those. Nothing here is changed by later commits (entries are
    immutable and these containers are this snapshot's own)."""

    vault: Vault
    index: _SearchIndex | None
    full: list[StoredEntry] | None  # every entry, when there is no index to search
    stale: frozenset[str]
    changed: list[StoredEntry]
    at: int

    def ensure_index(self) -> _SearchIndex:
        if self.index is None:
            self.index = _SearchIndex(self.full or [])
            self.vault._install_index(self.index, self.at)
        return self.index

    def search(
        self,
        query: str,
        space: str | None = None,
        type_: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        visible: Callable[[StoredEntry], bool] | None = None,
    ) -> list[tuple[StoredEntry, float]]:
        q = query.casefold().strip()
        index = self.ensure_index()
        stale = self.stale
        hits: list[tuple[StoredEntry, float]] = []

        def score(among: Iterable[StoredEntry]) -> None:
            if stale:
                among = (e for e in among if e.id not in stale)
            for n, e in enumerate(self.vault.iter_entries(space, type_, tag, visible, among)):
                s = _score(e, q)
                if s > 0:
                    hits.append((e, s))
                if n % 1024 == 1023:
                    _yield_gil()  # searches run in a thread: let the event loop have the GIL

        # entries changed since the index was built (up to n/16 of them before a rebuild)
        changed = self.vault.iter_entries(space, type_, tag, visible, among=self.changed)
        for n, e in enumerate(changed):
            s = _score(e, q)
            if s > 0:
                hits.append((e, s))
            if n % 1024 == 1023:
                _yield_gil()  # searches run in a thread: let the event loop have the GIL
        if not _SearchIndex.usable_for(q):
            score(index.entries)
            hits.sort(key=lambda h: (-h[1], h[0].name.casefold()))
            return hits[:limit]

        # Ranked straight from the index: a name hit's score follows from where the query
        # sits in the name (100 whole name, 80 at its start, 60 inside), every other text hit
        # scores 40 and a subsequence-only one 20, exactly as `_score` decides. The index
        # yields candidates in (score, name) order and the filters run only until `limit`
        # pass, so a common query ("github": 2k hits at 100k) reads 50 of them, not all.
        taken = 0
        for n, (s, i) in enumerate(index.ranked(q)):
            e = index.entries[i]
            if e.id not in stale and (
                (space is None or e.space == space)
                and (type_ is None or e.type == type_)
                and (tag is None or tag in e.tags)
                and (visible is None or visible(e))
            ):
                hits.append((e, s))
                taken += 1
                if taken >= limit:
                    break  # before asking for another: that may start the next tier's scan
            if n % 1024 == 1023:
                _yield_gil()  # searches run in a thread: let the event loop have the GIL
        hits.sort(key=lambda h: (-h[1], h[0].name.casefold()))
        return hits[:limit]


def _score(e: StoredEntry, q: str) -> float:
    name = e.name.casefold()
    if any(c in q for c in "*?["):
        return 30.0 if fnmatch.fnmatchcase(name, q) else 0.0
    if name == q:
        return 100.0
    if name.startswith(q):
        return 80.0
    if q in name:
        return 60.0
    for text in _haystack(e):
        if q in text.casefold():
            return 40.0
    if len(q) >= 2 and _subsequence(q, name):
        return 20.0
    return 0.0


def _subsequence(q: str, text: str) -> bool:
    it = iter(text)
    return all(c in it for c in q)
