"""1Password: the `.1pux` export (a zip holding `export.data`, JSON) and the CSV export.

In `.1pux`, an item's `overview` has title, url(s) and tags; `details.loginFields` hold the
username/password (by `designation`), `details.password` the main password of Password items,
`details.notesPlain` the notes, and `details.sections[].fields[]` typed values: `concealed`
(secret), `totp` (otpauth URI or seed), `string`/`url`/`email`/`phone`/`date`... (plain).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from broker.wire.errors import InvalidParameters

from . import ImportContext, Loaded, Record, read_text, totp_of
from .browser_csv import rows

MAX_DATA = 256 * 1024 * 1024
CATEGORIES = {
    "001": "login",
    "002": "card",
    "003": "note",
    "004": "identity",
    "005": "login",  # Password
    "102": "custom",  # Database
    "112": "api_key",  # API Credential
    "114": "ssh_key",
}


def _plain_value(value: dict[str, Any]) -> tuple[str | None, bool, bool]:
    """(text, secret?, totp?) of a section field's typed value."""
    for kind, v in value.items():
        if kind == "concealed":
            return (str(v) if v else None), True, False
        if kind == "totp":
            return (str(v) if v else None), True, True
        if kind == "sshKey" and isinstance(v, dict):
            return (str(v.get("privateKey") or "") or None), True, False
        if kind == "email" and isinstance(v, dict):
            return (str(v.get("email_address") or "") or None), False, False
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            return (str(v) if v != "" else None), False, False
    return None, False, False


def _item(item: dict[str, Any], vault: str) -> Record | None:
    if item.get("state") == "archived" or item.get("trashed"):
        return None
    ov = item.get("overview") or {}
    det = item.get("details") or {}
    kind = CATEGORIES.get(str(item.get("categoryUuid", "")), "custom")
    rec = Record(
        name=str(ov.get("title") or "").strip(),
        kind=kind,
        url=str(ov.get("url") or "") or None,
        notes=str(det.get("notesPlain") or "") or None,
        folder=vault or None,
        tags=[str(t) for t in ov.get("tags") or []],
    )
    for f in det.get("loginFields") or []:
        designation, value = f.get("designation"), str(f.get("value") or "")
        if designation == "username":
            rec.username = value or None
        elif designation == "password":
            rec.password = value or None
        elif value:  # other form fields of the login: kept, secret if 1Password hid them
            label = str(f.get("name") or f.get("id") or "field")
            (rec.secret if f.get("fieldType") == "P" else rec.plain)[label] = value
    if det.get("password"):
        rec.password = str(det["password"])
    for section in det.get("sections") or []:
        for f in section.get("fields") or []:
            text, secret, is_totp = _plain_value(f.get("value") or {})
            if text is None:
                continue
            label = str(f.get("title") or f.get("id") or "field")
            if is_totp and rec.take_totp(text):
                continue
            if kind == "ssh_key" and secret and "private_key" not in rec.secret:
                rec.secret["private_key"] = text
            elif kind == "api_key" and secret and rec.password is None:
                rec.password = text
            else:
                rec.put(label, text, secret)
    return rec


def load_1pux(path: Path, ctx: ImportContext) -> Loaded:
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("export.data")
            if info.file_size > MAX_DATA:
                raise InvalidParameters("export.data is too large")
            doc = json.loads(z.read(info))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise InvalidParameters("not a 1Password .1pux archive (a zip with export.data)") from exc
    except (OSError, ValueError) as exc:
        raise InvalidParameters("cannot read the .1pux archive's export.data") from exc
    out = Loaded()
    for account in doc.get("accounts") or []:
        for vault in account.get("vaults") or []:
            vname = str((vault.get("attrs") or {}).get("name") or "")
            for item in vault.get("items") or []:
                try:
                    rec = _item(item, vname)
                except (AttributeError, TypeError, ValueError):
                    out.failed.append((str(item.get("uuid", "?"))[:40], "unreadable item"))
                    continue
                if rec is not None:
                    out.records.append(rec)
    return out


def load_csv(path: Path, ctx: ImportContext) -> Loaded:
    """1Password 8's CSV: Title, Url, Username, Password, OTPAuth, Favorite, Archived, Tags,
    Notes (older versions: title, website/url, username, password, notes)."""
    out = Loaded()
    for i, row in enumerate(rows(read_text(path)), start=2):
        name = (row.get("title") or row.get("name") or "").strip()
        if row.get("archived", "").strip().lower() == "true":
            continue
        tags = [t.strip() for t in (row.get("tags") or "").split(",") if t.strip()]
        rec = Record(
            name=name or f"line {i}",
            username=row.get("username") or None,
            password=row.get("password") or None,
            url=(row.get("url") or row.get("website") or "").strip() or None,
            notes=row.get("notes") or None,
            totp=totp_of(row.get("otpauth") or row.get("one-time password")),
            tags=tags,
        )
        raw_totp = row.get("otpauth") or row.get("one-time password")
        if raw_totp and rec.totp is None:  # not a TOTP apm reads: kept, not lost
            rec.secret["otp"] = raw_totp
        if not (rec.password or rec.totp or rec.notes or rec.secret):
            out.failed.append((rec.name, f"line {i}: nothing secret to import"))
            continue
        if not rec.password and rec.notes and not rec.totp:
            rec.kind = "note"
        out.records.append(rec)
    return out
