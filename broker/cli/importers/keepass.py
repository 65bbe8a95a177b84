"""KeePass databases (KDBX 3.1 and 4), read with pykeepass.

Groups become tags (the path below the root, joined with "/"); the recycle bin is skipped.
TOTP is recognised in the forms KeePass tools write it: KeePassXC's `otp` (an otpauth URI),
KeePass 2.47+'s `TimeOtp-Secret-Base32` (with TimeOtp-Length/-Period/-Algorithm), and the
older `TOTP Seed` of KeeOtp/KeePassXC 2.5. Other custom strings keep KeePass's "protected"
flag as apm's secret/plain split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from broker.wire.errors import BadPassword, InvalidParameters

from . import ImportContext, Loaded, Record, totp_of

TOTP_KEYS = {
    "otp",
    "TimeOtp-Secret-Base32",
    "TimeOtp-Length",
    "TimeOtp-Period",
    "TimeOtp-Algorithm",
    "TOTP Seed",
    "TOTP Settings",
}


def _keepass_totp(props: dict[str, str]) -> str | None:
    if props.get("otp"):
        return totp_of(props["otp"])
    seed = props.get("TimeOtp-Secret-Base32")
    if seed:
        secret = totp_of(seed)
        if secret is None:
            return None
        digits = props.get("TimeOtp-Length", "6")
        period = props.get("TimeOtp-Period", "30")
        algo = props.get("TimeOtp-Algorithm", "HMAC-SHA-1").upper().replace("HMAC-", "")
        algo = algo.replace("-", "")
        return (
            f"otpauth://totp/{quote('keepass')}?secret={secret}&digits={digits}"
            f"&period={period}&algorithm={algo}"
        )
    if props.get("TOTP Seed"):
        return totp_of(props["TOTP Seed"])
    return None


def _entry(e: Any, recycle: Any) -> Record | None:
    group = e.group
    path: list[str] = []
    while group is not None and not group.is_root_group:
        if recycle is not None and group.uuid == recycle.uuid:
            return None
        path.insert(0, group.name or "")
        group = group.parentgroup
    props: dict[str, str] = {k: v for k, v in (e.custom_properties or {}).items() if v}
    if e.otp:  # pykeepass counts `otp` among the reserved keys, outside custom_properties
        props.setdefault("otp", e.otp)
    rec = Record(
        name=(e.title or "").strip(),
        username=e.username or None,
        password=e.password or None,
        url=e.url or None,
        notes=e.notes or None,
        folder="/".join(path) or None,
        tags=list(e.tags or []),
        totp=_keepass_totp(props),
    )
    for key, value in props.items():
        if key in TOTP_KEYS and rec.totp is not None:
            continue
        rec.put(key, value, secret=e.is_custom_property_protected(key))
    if not rec.password and rec.notes and not rec.totp and not props:
        rec.kind = "note"
    return rec


def load(path: Path, ctx: ImportContext) -> Loaded:
    try:
        from pykeepass import PyKeePass
        from pykeepass.exceptions import (
            CredentialsError,
            HeaderChecksumError,
            PayloadChecksumError,
        )
    except ImportError as exc:  # the GPL-3.0 library is an opt-in extra (pyproject.toml)
        raise InvalidParameters(
            "the KeePass importer needs pykeepass, which is not installed",
            hint="pip install 'apm-broker[keepass]' (pykeepass is GPL-3.0, so apm leaves it "
            "out of the default install)",
        ) from exc
    password = ctx.source_password("KeePass database password")
    if ctx.keyfile is not None and not ctx.keyfile.is_file():
        raise InvalidParameters(f"no such key file: {ctx.keyfile}")
    try:
        kp = PyKeePass(
            str(path),
            password=password.get_secret_value() or None,
            keyfile=str(ctx.keyfile) if ctx.keyfile else None,
        )
    except CredentialsError as exc:
        raise BadPassword("wrong password (or key file) for this KeePass database") from exc
    except (HeaderChecksumError, PayloadChecksumError) as exc:
        raise InvalidParameters("the KeePass database is corrupt") from exc
    except OSError as exc:
        raise InvalidParameters(f"cannot read {path}: {exc.strerror}") from exc
    except Exception as exc:  # construct raises many types on a non-KDBX file
        raise InvalidParameters("not a KeePass KDBX database") from exc
    out = Loaded()
    recycle = kp.recyclebin_group
    for e in kp.entries:
        rec = _entry(e, recycle)
        if rec is None:
            continue
        if not rec.name:
            rec.name = rec.url or rec.username or "untitled"
        out.records.append(rec)
    return out
