"""Importers: other tools' exports read into `Record`s, then mapped onto apm's entry types.

Each format module has `load(path, ctx) -> Loaded`. Formats are found through the
`apm.plugins` entry-point group (built-ins register there too; see broker/cli/plugins.py).

Mapping rules (the same for every format):
- a login with a password -> `login` (username, password; url); TOTP -> a companion `totp`
  entry "<name> (totp)"; custom fields and notes -> a companion `custom` entry
  "<name> (fields)" whose fields keep the source's secret/plain split, notes always secret
  (notes in password managers hold recovery codes; an entry's `notes` are visible at `read`);
- a secure note -> `note`; an SSH key -> `ssh_key`; cards, identities, anything else ->
  `custom`; an item with a TOTP seed only -> `totp`.
- folders and groups become tags; every entry also gets the tag `from-<format>`.

Rules:
- A record never reaches stdout or stderr; failures name the item and a reason, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr, ValidationError

from broker.wire.entries import NAME_MAX, TAG_MAX
from broker.wire.protocol import EntryAddParams, SecretValue

_FIELD_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Record:
    name: str
    kind: str = "login"  # login, note, ssh_key, card, identity, api_key, custom
    username: str | None = None
    password: str | None = None
    url: str | None = None
    notes: str | None = None
    totp: str | None = None  # an otpauth:// URI or a base32 seed
    folder: str | None = None
    tags: list[str] = field(default_factory=list)
    plain: dict[str, str] = field(default_factory=dict)  # custom, non-secret
    secret: dict[str, str] = field(default_factory=dict)  # custom, secret


@dataclass
class Loaded:
    records: list[Record] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)


@dataclass
class ImportContext:
    """What a loader may ask for: the export's own password (prompted or from stdin)."""

    source_password: Callable[[str], SecretStr]
    keyfile: Path | None = None  # KeePass: a key file, with or without a password


def field_name(raw: str, taken: set[str] | dict[str, str]) -> str:
    base = _FIELD_BAD.sub("_", raw.strip()).strip("_")[:60] or "field"
    name, n = base, 2
    while name in taken:
        name = f"{base}_{n}"
        n += 1
    return name


def totp_of(value: str | None) -> str | None:
    """A TOTP secret as the vault takes it (otpauth URI or base32), or None."""
    if not value:
        return None
    v = value.strip()
    if v.lower().startswith("otpauth://totp/"):
        return v
    compact = v.replace(" ", "").replace("-", "")
    if re.fullmatch(r"[A-Za-z2-7]+=*", compact) and len(compact) >= 16:
        return compact.upper()
    return None


def _clean_tag(raw: str) -> str:
    return "".join(c for c in raw if ord(c) >= 32 and c != "\x7f").strip()[:TAG_MAX].strip()


def _tags(rec: Record, fmt: str) -> list[str]:
    out: list[str] = []
    for raw in [f"from-{fmt}", rec.folder or "", *rec.tags]:
        t = _clean_tag(raw)
        if t and t not in out:
            out.append(t)
    return out[:64]


def _name(base: str, suffix: str = "") -> str:
    return base[: NAME_MAX - len(suffix)] + suffix


def _sv(value: str) -> SecretValue:
    return SecretValue(value=SecretStr(value))


def to_params(rec: Record, space: str, fmt: str) -> list[EntryAddParams]:
    """One record as the entries to add (main entry first, then companions)."""
    tags = _tags(rec, fmt)
    out: list[EntryAddParams] = []
    plain, secret = dict(rec.plain), dict(rec.secret)
    notes = rec.notes
    main_done = False
    if rec.kind == "login" and rec.password:
        out.append(
            EntryAddParams(
                type="login",
                name=_name(rec.name),
                space=space,
                tags=tags,
                url=rec.url,
                fields={"username": rec.username} if rec.username else {},
                secrets={"password": _sv(rec.password)},
            )
        )
        main_done = True
    elif rec.kind == "note" and (rec.notes or not (plain or secret)):
        out.append(
            EntryAddParams(
                type="note",
                name=_name(rec.name),
                space=space,
                tags=tags,
                url=rec.url,
                secrets={"content": _sv(rec.notes or "")},
            )
        )
        main_done = True
        notes = None
    elif rec.kind == "ssh_key" and secret.get("private_key"):
        pub = plain.pop("public_key", None)
        out.append(
            EntryAddParams(
                type="ssh_key",
                name=_name(rec.name),
                space=space,
                tags=tags,
                fields={"public_key": pub} if pub else {},
                secrets={"private_key": _sv(secret.pop("private_key"))},
            )
        )
        main_done = True
    elif rec.kind == "api_key" and rec.password:
        out.append(
            EntryAddParams(
                type="api_key",
                name=_name(rec.name),
                space=space,
                tags=tags,
                url=rec.url,
                secrets={"key": _sv(rec.password)},
            )
        )
        main_done = True
    if not main_done and rec.totp and not (rec.password or plain or secret or notes):
        return [_totp(rec, rec.name, space, tags)]
    if not main_done:
        # everything else (cards, identities, logins without a password): one custom entry
        if rec.username:
            plain.setdefault("username", rec.username)
        if rec.password:
            secret.setdefault("password", rec.password)
    extra_plain, extra_secret = plain, secret
    if notes:
        extra_secret[field_name("notes", {**extra_plain, **extra_secret})] = notes
    if extra_plain or extra_secret:
        names: dict[str, str] = {}
        fields: dict[str, str] = {}
        secrets: dict[str, SecretValue] = {}
        for k, v in extra_plain.items():
            n = field_name(k, names)
            names[n] = k
            fields[n] = v
        for k, v in extra_secret.items():
            n = field_name(k, names)
            names[n] = k
            secrets[n] = _sv(v)
        out.append(
            EntryAddParams(
                type="custom",
                name=_name(rec.name, " (fields)" if main_done else ""),
                space=space,
                tags=tags,
                url=None if main_done else rec.url,
                fields=fields,
                secrets=secrets,
            )
        )
    if rec.totp:
        out.append(_totp(rec, _name(rec.name, " (totp)"), space, tags))
    return out


def _totp(rec: Record, name: str, space: str, tags: list[str]) -> EntryAddParams:
    fields = {"account": rec.username} if rec.username else {}
    return EntryAddParams(
        type="totp",
        name=_name(name),
        space=space,
        tags=tags,
        url=rec.url,
        fields=fields,
        secrets={"secret": _sv(rec.totp or "")},
    )


def disambiguate(records: list[Record]) -> None:
    """Items that share a name inside one export get " (folder)" added when that tells them
    apart, else " (username)"; what is still the same is left to --on-duplicate."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.name, []).append(r)
    for same in groups.values():
        if len(same) < 2:
            continue
        folders = [r.folder for r in same]
        use_folder = all(folders) and len(set(folders)) == len(folders)
        for r in same:
            qual = r.folder if use_folder else r.username
            if qual:
                r.name = f"{r.name} ({qual})"


def build(
    loaded: Loaded, space: str, fmt: str
) -> tuple[list[EntryAddParams], list[tuple[str, str]]]:
    """Records to entry params; a record that does not fit fails alone, with field paths."""
    disambiguate(loaded.records)
    params: list[EntryAddParams] = []
    failed = list(loaded.failed)
    for rec in loaded.records:
        if not rec.name.strip():
            failed.append(("(unnamed)", "the item has no name"))
            continue
        try:
            params += to_params(rec, space, fmt)
        except ValidationError as exc:
            where = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            failed.append((rec.name[:80], "invalid " + ", ".join(where)))
    return params, failed


def read_text(path: Path) -> str:
    from broker.wire.errors import InvalidParameters

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidParameters(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidParameters(f"{path} is not UTF-8 text") from exc
