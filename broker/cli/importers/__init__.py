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
from dataclasses import dataclass, field, replace
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

    def take_totp(self, value: str) -> bool:
        """Keep `value` as the record's TOTP if it is one and the record has none yet."""
        if self.totp is not None or totp_of(value) is None:
            return False
        self.totp = totp_of(value)
        return True

    def put(self, label: str, value: str, secret: bool) -> None:
        """A custom field, on the secret or the plain side as the source marked it."""
        (self.secret if secret else self.plain)[label] = value


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


def _params(
    type_: str,
    name: str,
    space: str,
    tags: list[str],
    secrets: dict[str, str],
    *,
    url: str | None = None,
    fields: dict[str, str] | None = None,
) -> EntryAddParams:
    return EntryAddParams(
        type=type_,
        name=_name(name),
        space=space,
        tags=tags,
        url=url,
        fields=fields or {},
        secrets={k: _sv(v) for k, v in secrets.items()},
    )


def _main_entry(rec: Record, space: str, tags: list[str]) -> EntryAddParams | None:
    """The record's own entry when it is of a kind apm has a type for (login, note, ssh_key,
    api_key); takes what it uses out of `rec` (a note's text, an ssh key's key fields)."""
    at = (rec.name, space, tags)
    if rec.kind == "login" and rec.password:
        user = {"username": rec.username} if rec.username else {}
        return _params("login", *at, {"password": rec.password}, url=rec.url, fields=user)
    if rec.kind == "note" and (rec.notes or not (rec.plain or rec.secret)):
        content, rec.notes = rec.notes or "", None
        return _params("note", *at, {"content": content}, url=rec.url)
    if rec.kind == "ssh_key" and rec.secret.get("private_key"):
        pub = rec.plain.pop("public_key", None)
        key = {"private_key": rec.secret.pop("private_key")}
        return _params("ssh_key", *at, key, fields={"public_key": pub} if pub else {})
    if rec.kind == "api_key" and rec.password:
        return _params("api_key", *at, {"key": rec.password}, url=rec.url)
    return None


def to_params(rec: Record, space: str, fmt: str) -> list[EntryAddParams]:
    """One record as the entries to add (main entry first, then companions)."""
    tags = _tags(rec, fmt)
    rec = replace(rec, plain=dict(rec.plain), secret=dict(rec.secret))  # the caller's stays
    main = _main_entry(rec, space, tags)
    out = [main] if main is not None else []
    plain, secret, notes = rec.plain, rec.secret, rec.notes
    if main is None and rec.totp and not (rec.password or plain or secret or notes):
        return [_totp(rec, rec.name, space, tags)]
    if main is None:
        # everything else (cards, identities, logins without a password): one custom entry
        if rec.username:
            plain.setdefault("username", rec.username)
        if rec.password:
            secret.setdefault("password", rec.password)
    if notes:
        secret[field_name("notes", {**plain, **secret})] = notes
    if plain or secret:
        names: dict[str, str] = {}
        fields: dict[str, str] = {}
        secrets: dict[str, str] = {}
        for side, values in ((fields, plain), (secrets, secret)):
            for k, v in values.items():
                n = field_name(k, names)
                names[n] = k
                side[n] = v
        name = _name(rec.name, " (fields)" if main is not None else "")
        url = None if main is not None else rec.url
        out.append(_params("custom", name, space, tags, secrets, url=url, fields=fields))
    if rec.totp:
        out.append(_totp(rec, _name(rec.name, " (totp)"), space, tags))
    return out


def _totp(rec: Record, name: str, space: str, tags: list[str]) -> EntryAddParams:
    account = {"account": rec.username} if rec.username else {}
    return _params(
        "totp", name, space, tags, {"secret": rec.totp or ""}, url=rec.url, fields=account
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
