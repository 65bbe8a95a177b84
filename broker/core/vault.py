"""The unlocked vault: entries and spaces in memory, secret values sealed one by one.

Rules:
- In memory, only metadata is in the clear; each secret field value stays sealed under the DEK
  (associated data = entry id + field name) until a request that may see it opens it.
- Entries are immutable models: a change builds a new one, so a failed save can restore the
  previous state exactly.
- Every mutation is saved durably before it is acknowledged; if the save fails the in-memory
  state is rolled back and the error is raised.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import fnmatch
import operator
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pydantic_core
from pydantic import BaseModel, Field, ValidationError

from broker.wire.entries import (
    DEFAULT_SPACE,
    ENTRY_TYPES,
    FIELD_NAME_PATTERN,
    EntryMeta,
    EntryType,
    FieldMeta,
)
from broker.wire.errors import (
    AlreadyExists,
    AmbiguousEntry,
    BadPassword,
    EntryNotFound,
    InvalidParameters,
    SpaceNotEmpty,
    SpaceNotFound,
    VaultCorrupt,
)

from . import crypto, totp, vault_file
from .audit import derive_audit_key
from .crypto import Cipher, DecryptionFailed, KdfParams
from .vault_file import Header

HISTORY_MAX = 10
_FIELD_RE = re.compile(FIELD_NAME_PATTERN)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


class HistoryItem(BaseModel):
    sealed: str
    replaced_at: datetime


class StoredField(BaseModel):
    secret: bool
    value: str | None = None  # non-secret fields only
    sealed: str | None = None  # secret fields: b64(nonce || ct), AD = id \0 field
    history: list[HistoryItem] = Field(default_factory=list)


class StoredEntry(BaseModel):
    """One entry as the vault holds it. Never changed in place: an edit stores a new object
    (model_copy), which the search index and the save's per-entry JSON rely on."""

    id: str
    name: str
    type: EntryType
    space: str
    tags: list[str] = Field(default_factory=list)
    url: str | None = None
    notes: str | None = None
    fields: dict[str, StoredField] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime

    def meta(self) -> EntryMeta:
        # built from already-validated fields: construct skips a second validation (this runs
        # for every entry a tool call or a listing returns)
        return EntryMeta.model_construct(
            id=self.id,
            name=self.name,
            type=self.type,
            space=self.space,
            tags=list(self.tags),
            url=self.url,
            notes=self.notes,
            fields={
                k: FieldMeta.model_construct(
                    secret=f.secret, value=None if f.secret else f.value, history=len(f.history)
                )
                for k, f in self.fields.items()
            },
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


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


def _field_ad(entry_id: str, field: str) -> bytes:
    return f"{entry_id}\x00{field}".encode()


def _key(space: str, name: str) -> tuple[str, str]:
    return (space, name.casefold())


class SaveHook(Protocol):
    """Called around every write of the vault file (core/rollback.py: generation + audit head)."""

    def before(self, vault: Vault) -> None: ...
    def after(self, vault: Vault) -> None: ...


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
    ) -> None:
        self.path = path
        self.header = header
        self._header_bytes = vault_file.prefix(header)
        self._keyblock = keyblock
        self._dek = dek
        self._cipher = Cipher(dek)
        self._clock = clock
        self.spaces: list[str] = list(payload.spaces)
        self.extra: dict[str, Any] = dict(payload.extra)
        self.entries: dict[str, StoredEntry] = {e.id: e for e in payload.entries}
        self._by_name: dict[tuple[str, str], str] = {}
        self._by_fold: dict[str, list[str]] = {}
        self._search: _SearchIndex | None = None
        self._entry_json: dict[str, tuple[StoredEntry, bytes]] = {}
        self._reindex()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        path: Path,
        password: bytearray,
        params: KdfParams,
        clock: Callable[[], datetime] = utcnow,
    ) -> Vault:
        header = Header(kdf=params, salt=crypto.random_bytes(crypto.SALT_BYTES))
        dek = crypto.new_key()
        keyblock = _wrap(dek, password, header)
        vault = cls(path, header, keyblock, dek, Payload(), clock)
        vault.save()
        return vault

    @classmethod
    def open(cls, path: Path, password: bytearray, clock: Callable[[], datetime] = utcnow) -> Vault:
        blob = vault_file.read(path)
        dek = _unwrap(blob.keyblock, password, blob.header, blob.header_bytes)
        try:
            raw = Cipher(dek).open(blob.payload, blob.payload_ad)
        except DecryptionFailed as exc:
            crypto.zero(dek)
            raise VaultCorrupt("vault payload failed authentication") from exc
        try:
            payload = Payload.model_validate_json(raw)
        except ValidationError as exc:
            crypto.zero(dek)
            raise VaultCorrupt("vault payload is unreadable") from exc
        vault_file.remove_stale_temps(path)  # only once the password proved it is ours
        return cls(path, blob.header, blob.keyblock, dek, payload, clock)

    @staticmethod
    def check_password_on_disk(path: Path, password: bytearray) -> None:
        """Prove the master password against the file without opening the payload."""
        blob = vault_file.read(path)
        crypto.zero(_unwrap(blob.keyblock, password, blob.header, blob.header_bytes))

    def check_password(self, password: bytearray) -> None:
        dek = _unwrap(self._keyblock, password, self.header, self._header_bytes)
        crypto.zero(dek)

    def audit_key(self) -> bytes:
        """The audit log's MAC key, derived one-way from the DEK (see core/audit.py)."""
        return derive_audit_key(self._dek)

    def close(self) -> None:
        crypto.zero(self._dek)
        self._cipher.close()
        self.entries = {}
        self._by_name = {}
        self._by_fold = {}

    def rewrap(self, password: bytearray, params: KdfParams) -> None:
        """New salt and KEK (password or profile change); the DEK and payload stay the same.

        The backup is replaced too, so no copy on this machine still opens with the old
        password (the DEK is unchanged: copies made elsewhere before still do).
        """
        old = (self.header, self._header_bytes, self._keyblock)
        self.header = Header(kdf=params, salt=crypto.random_bytes(crypto.SALT_BYTES))
        self._header_bytes = vault_file.prefix(self.header)
        self._keyblock = _wrap(self._dek, password, self.header)
        try:
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

    def payload_json(self) -> bytes:
        """The plaintext the vault file encrypts: `Payload` as JSON (UTF-8).

        Each entry's JSON is kept from the save before and reused while the entry object is
        the same (the vault replaces an entry on every change), so a save serializes only
        what changed; pydantic serialization was two thirds of a save at 100k entries. The
        cache holds what the entry objects hold: sealed values, never a plaintext secret."""
        cache: dict[str, tuple[StoredEntry, bytes]] = {}
        old = self._entry_json
        for e in self.entries.values():
            hit = old.get(e.id)
            if hit is None or hit[0] is not e:
                hit = (e, e.__pydantic_serializer__.to_json(e, by_alias=True))
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
        payload = self.payload_json()
        ad = self._header_bytes + len(self._keyblock).to_bytes(4, "big") + self._keyblock
        sealed = self._cipher.seal(payload, ad)
        return vault_file.encode(self._header_bytes, self._keyblock, sealed)

    def save(self) -> None:
        if self.save_hook is not None:
            self.save_hook.before(self)
        vault_file.atomic_write(self.path, self.encode())
        if self.save_hook is not None:
            self.save_hook.after(self)

    @contextlib.contextmanager
    def mutation(self) -> Iterator[None]:
        """Apply a change and save it; on any failure restore the previous state."""
        snapshot = (dict(self.entries), list(self.spaces), dict(self.extra))
        try:
            yield
            self.save()
        except BaseException:
            self.entries, self.spaces, self.extra = snapshot
            self._reindex()
            raise

    # ------------------------------------------------------------------ lookups

    def _reindex(self) -> None:
        self._by_name = {_key(e.space, e.name): e.id for e in self.entries.values()}
        self._by_fold = {}
        for (_, folded), eid in self._by_name.items():
            self._by_fold.setdefault(folded, []).append(eid)

    def resolve(
        self,
        ref: str,
        space: str | None = None,
        visible: Callable[[StoredEntry], bool] | None = None,
    ) -> StoredEntry:
        """By id, or by name (case-insensitive). Entries `visible` rejects behave as absent."""
        ok = visible or (lambda _e: True)
        entry = self.entries.get(ref)
        if entry is not None and (space is None or entry.space == space) and ok(entry):
            return entry
        if space is not None:
            eid = self._by_name.get(_key(space, ref))
            if eid is None or not ok(self.entries[eid]):
                raise EntryNotFound(data={"space": space})
            return self.entries[eid]
        folded = ref.casefold()
        matches = [self.entries[i] for i in self._by_fold.get(folded, ()) if ok(self.entries[i])]
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
        q = query.casefold().strip()
        candidates: Iterable[StoredEntry] | None = None  # None: every entry
        if _SearchIndex.usable_for(q):
            if self._search is None or not self._search.current(self.entries):
                self._search = _SearchIndex(self.entries)
            candidates = self._search.candidates(q)
        hits: list[tuple[StoredEntry, float]] = []
        for e in self.iter_entries(space, type_, tag, visible, among=candidates):
            score = _score(e, q)
            if score > 0:
                hits.append((e, score))
        hits.sort(key=lambda h: (-h[1], h[0].name.casefold()))
        return hits[:limit]

    @staticmethod
    def default_field(entry: StoredEntry) -> str:
        """The field `get` opens when none is named: the type's main secret."""
        field = ENTRY_TYPES[entry.type].primary or next(
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
        return field, self._open(entry.id, field, stored.sealed or "")

    def previous(self, entry: StoredEntry, field: str, version: int) -> str:
        """Open a secret field's value from `version` changes ago (1 = the one before now)."""
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

    def _open(self, entry_id: str, field: str, sealed: str) -> str:
        try:
            return self._cipher.open(base64.b64decode(sealed), _field_ad(entry_id, field)).decode()
        except (DecryptionFailed, ValueError) as exc:
            raise VaultCorrupt("a sealed field failed authentication") from exc

    def _seal(self, entry_id: str, field: str, value: str) -> str:
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
        name = _clean_name(name)
        if space not in self.spaces:
            raise SpaceNotFound(
                data={"space": space}, hint=f'create it with "apm space add {space}"'
            )
        if _key(space, name) in self._by_name:
            raise AlreadyExists("an entry with this name already exists in the space")
        now = self._clock()
        entry_id = str(uuid.uuid4())
        fields = self._build_fields(entry_id, type_, {}, change)
        spec = ENTRY_TYPES[type_]
        missing = [f.name for f in spec.fields if f.required and f.name not in fields]
        if missing:
            raise InvalidParameters(
                "missing required field(s)", data={"fields": missing}, hint="provide them"
            )
        entry = StoredEntry(
            id=entry_id,
            name=name,
            type=type_,
            space=space,
            tags=_clean_tags(tags),
            url=url,
            notes=notes,
            fields=fields,
            created_at=now,
            updated_at=now,
        )
        with self.mutation():
            self.entries[entry.id] = entry
            self._by_name[_key(space, name)] = entry.id
            self._by_fold.setdefault(name.casefold(), []).append(entry.id)
        return entry

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
        name = _clean_name(new_name) if new_name is not None else entry.name
        space = move_to if move_to is not None else entry.space
        if space not in self.spaces:
            raise SpaceNotFound(data={"space": space})
        other = self._by_name.get(_key(space, name))
        if other is not None and other != entry.id:
            raise AlreadyExists("an entry with this name already exists in the space")
        fields = self._build_fields(entry.id, entry.type, entry.fields, change)
        spec = ENTRY_TYPES[entry.type]
        missing = [f.name for f in spec.fields if f.required and f.name not in fields]
        if missing:
            raise InvalidParameters("cannot remove a required field", data={"fields": missing})
        tags = [t for t in entry.tags if t not in set(remove_tags)]
        tags = _clean_tags(tags + [t for t in add_tags if t not in tags])
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
            self._reindex()
        return updated

    def remove(self, entry: StoredEntry) -> None:
        with self.mutation():
            del self.entries[entry.id]
            self._by_name.pop(_key(entry.space, entry.name), None)
            ids = self._by_fold.get(entry.name.casefold(), [])
            if entry.id in ids:
                ids.remove(entry.id)

    def _build_fields(
        self,
        entry_id: str,
        type_: str,
        current: dict[str, StoredField],
        change: Change,
    ) -> dict[str, StoredField]:
        spec = ENTRY_TYPES[type_]
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

    def space_rename(self, name: str, new_name: str) -> int:
        if name not in self.spaces:
            raise SpaceNotFound(data={"space": name})
        if new_name in self.spaces:
            raise AlreadyExists("space already exists", data={"space": new_name})
        moved = 0
        with self.mutation():
            self.spaces = [new_name if s == name else s for s in self.spaces]
            for e in list(self.entries.values()):
                if e.space == name:
                    self.entries[e.id] = e.model_copy(update={"space": new_name})
                    moved += 1
            self._reindex()
        return moved

    def space_remove(self, name: str, force: bool) -> int:
        if name not in self.spaces:
            raise SpaceNotFound(data={"space": name})
        doomed = [e.id for e in self.entries.values() if e.space == name]
        if doomed and not force:
            raise SpaceNotEmpty(data={"space": name, "entries": len(doomed)})
        with self.mutation():
            self.spaces = [s for s in self.spaces if s != name]
            for eid in doomed:
                del self.entries[eid]
            self._reindex()
        return len(doomed)


# ---------------------------------------------------------------------- helpers


def _wrap(dek: bytearray, password: bytearray, header: Header) -> bytes:
    kek = crypto.derive_key(password, header.salt, header.kdf)
    try:
        return Cipher(kek).seal(bytes(dek), vault_file.prefix(header))
    finally:
        crypto.zero(kek)


def _unwrap(keyblock: bytes, password: bytearray, header: Header, header_bytes: bytes) -> bytearray:
    kek = crypto.derive_key(password, header.salt, header.kdf)
    try:
        return bytearray(Cipher(kek).open(keyblock, header_bytes))
    except DecryptionFailed as exc:
        raise BadPassword() from exc
    finally:
        crypto.zero(kek)


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


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name or any(ord(c) < 32 for c in name):
        raise InvalidParameters(
            "entry name must be non-empty printable text", data={"field": "name"}
        )
    return name


def _clean_tags(tags: list[str]) -> list[str]:
    out: list[str] = []
    for t in tags:
        t = t.strip()
        if not t or len(t) > 64 or any(ord(c) < 32 for c in t):
            raise InvalidParameters("invalid tag", data={"field": "tags"})
        if t not in out:
            out.append(t)
    return out


_SEP = "\x00"  # never in an entry name (names are printable) nor, checked, in a query


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
    entry: ~250 ms at 100k entries became a few ms plus the candidates.

    It only finds candidates; `_score` decides, so results are exactly those of a full scan
    (every entry that `_score` accepts contains the query in its name or other text, or has
    it as a subsequence of its name, each of which the index finds). It is rebuilt when the
    entries changed: the vault replaces an entry object on every edit, so comparing object
    identities in order is enough.
    """

    def __init__(self, entries: dict[str, StoredEntry]) -> None:
        self.entries = list(entries.values())
        names: list[str] = []
        hays: list[str] = []
        self.name_starts: list[int] = []
        self.hay_starts: list[int] = []
        n_pos = h_pos = 0
        for e in self.entries:
            name = e.name.casefold()
            hay = _SEP.join(t.casefold() for t in _haystack(e))
            self.name_starts.append(n_pos)
            self.hay_starts.append(h_pos)
            names.append(name)
            hays.append(hay)
            n_pos += len(name) + 1
            h_pos += len(hay) + 1
        self.names = _SEP.join(names)
        self.hays = _SEP.join(hays)

    @staticmethod
    def usable_for(q: str) -> bool:
        return bool(q) and _SEP not in q and not any(c in q for c in "*?[")

    def current(self, entries: dict[str, StoredEntry]) -> bool:
        return len(entries) == len(self.entries) and all(
            map(operator.is_, entries.values(), self.entries)
        )

    def candidates(self, q: str) -> Iterator[StoredEntry]:
        found: set[int] = set()
        for text, starts in ((self.names, self.name_starts), (self.hays, self.hay_starts)):
            at = text.find(q)
            while at >= 0:
                found.add(bisect.bisect_right(starts, at) - 1)
                at = text.find(q, at + 1)
        if len(q) >= 2:
            gap = f"[^{_SEP}]*?"
            pattern = re.compile(gap.join(re.escape(c) for c in q))
            for m in pattern.finditer(self.names):
                found.add(bisect.bisect_right(self.name_starts, m.start()) - 1)
        return (self.entries[i] for i in sorted(found))


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
