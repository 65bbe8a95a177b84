"""Bitwarden JSON exports: plain, and password-protected (decrypted here with its password).

A password-protected export is `{encrypted: true, passwordProtected: true, salt, kdfType,
kdfIterations, kdfMemory, kdfParallelism, encKeyValidation_DO_NOT_EDIT, data}` where `data`
is an EncString of the plain export. Bitwarden's documented scheme:
- key = PBKDF2-SHA256(password, salt, kdfIterations, 32 bytes) for kdfType 0, or
  Argon2id(password, SHA-256(salt), t=kdfIterations, m=kdfMemory MiB, p=kdfParallelism,
  32 bytes) for kdfType 1 — the salt is the file's salt *string* as UTF-8, not base64-decoded;
- stretched: enc = HKDF-Expand-SHA256(key, "enc", 32), mac = HKDF-Expand-SHA256(key, "mac", 32);
- EncString type 2 `2.<iv b64>|<ciphertext b64>|<mac b64>`: AES-256-CBC (PKCS#7) with enc,
  authenticated by HMAC-SHA256(mac, iv || ciphertext), checked before decrypting.
Account-restricted exports (encrypted with the account's own key) cannot be read outside
Bitwarden: we say so.

Rules:
- The MAC is checked in constant time before any decryption; a mismatch is a wrong password.
- KDF parameters come from an untrusted file: bounded above and below before deriving.
- `cryptography` and `argon2` are imported only here, only when a file is encrypted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from broker.wire.errors import BadPassword, InvalidParameters

from . import ImportContext, Loaded, Record, read_text, totp_of

MIN_PBKDF2 = 5_000
MAX_PBKDF2 = 10_000_000
ARGON2_MEMORY_MIB = (16, 1024)
ARGON2_ITERATIONS = (2, 10)
ARGON2_PARALLELISM = (1, 16)
KINDS = {1: "login", 2: "note", 3: "card", 4: "identity", 5: "ssh_key"}


def _hkdf_expand(prk: bytes, info: bytes) -> bytes:
    # one block is enough for 32 bytes: T(1) = HMAC(PRK, info || 0x01)
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidParameters(
            f"the export's {key} is missing or outside {lo}..{hi}", data={"field": key}
        )
    return v


def derive_keys(doc: dict[str, Any], password: str) -> tuple[bytes, bytes]:
    salt = doc.get("salt")
    if not isinstance(salt, str) or not salt:
        raise InvalidParameters("the export has no salt")
    kdf = doc.get("kdfType", 0)
    if kdf == 0:
        iterations = _int(doc, "kdfIterations", MIN_PBKDF2, MAX_PBKDF2)
        key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations, 32)
    elif kdf == 1:
        from argon2.low_level import Type, hash_secret_raw

        t = _int(doc, "kdfIterations", *ARGON2_ITERATIONS)
        m = _int(doc, "kdfMemory", *ARGON2_MEMORY_MIB)
        p = _int(doc, "kdfParallelism", *ARGON2_PARALLELISM)
        key = hash_secret_raw(
            password.encode(),
            hashlib.sha256(salt.encode()).digest(),
            time_cost=t,
            memory_cost=m * 1024,
            parallelism=p,
            hash_len=32,
            type=Type.ID,
        )
    else:
        raise InvalidParameters("unknown kdfType in the export", data={"kdfType": str(kdf)[:8]})
    return _hkdf_expand(key, b"enc"), _hkdf_expand(key, b"mac")


def decrypt_encstring(value: str, enc_key: bytes, mac_key: bytes) -> bytes:
    try:
        enc_type, _, rest = value.partition(".")
        iv_b64, ct_b64, mac_b64 = rest.split("|")
        iv, ct, mac = (base64.b64decode(x, validate=True) for x in (iv_b64, ct_b64, mac_b64))
    except (ValueError, binascii.Error) as exc:
        raise InvalidParameters("the export's encrypted data is malformed") from exc
    if enc_type != "2":
        raise InvalidParameters("the export uses an encryption type other than 2 (AES-CBC+HMAC)")
    if len(iv) != 16 or not ct or len(ct) % 16:
        raise InvalidParameters("the export's encrypted data is malformed")
    if not hmac.compare_digest(hmac.new(mac_key, iv + ct, hashlib.sha256).digest(), mac):
        raise BadPassword("wrong password for this Bitwarden export (MAC check failed)")
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    dec = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).decryptor()
    padded = dec.update(ct) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise InvalidParameters("the export's encrypted data is corrupt") from exc


def decrypt_export(doc: dict[str, Any], password: str) -> dict[str, Any]:
    enc_key, mac_key = derive_keys(doc, password)
    check = doc.get("encKeyValidation_DO_NOT_EDIT")
    if isinstance(check, str) and check:
        decrypt_encstring(check, enc_key, mac_key)  # a wrong password fails here, early
    data = doc.get("data")
    if not isinstance(data, str):
        raise InvalidParameters("the password-protected export has no data")
    try:
        inner = json.loads(decrypt_encstring(data, enc_key, mac_key))
    except ValueError as exc:
        raise InvalidParameters("the decrypted export is not JSON") from exc
    if not isinstance(inner, dict):
        raise InvalidParameters("the decrypted export is not a Bitwarden export")
    return inner


def _s(v: Any) -> str | None:
    return (
        str(v) if isinstance(v, str | int | float) and not isinstance(v, bool) and v != "" else None
    )


def _item(item: dict[str, Any], folders: dict[str, str]) -> Record | None:
    if item.get("deletedDate"):
        return None
    kind = KINDS.get(item.get("type", 1), "custom")
    rec = Record(
        name=(_s(item.get("name")) or "").strip(),
        kind=kind,
        notes=_s(item.get("notes")),
        folder=folders.get(str(item.get("folderId") or "")),
    )
    if kind == "login":
        login = item.get("login") or {}
        rec.username = _s(login.get("username"))
        rec.password = _s(login.get("password"))
        raw_totp = _s(login.get("totp"))
        rec.totp = totp_of(raw_totp)
        if raw_totp and rec.totp is None:  # steam://, hotp...: kept, not lost
            rec.secret["totp"] = raw_totp
        raw_uris = [u.get("uri") for u in login.get("uris") or [] if isinstance(u, dict)]
        uris: list[str] = [u for u in raw_uris if isinstance(u, str) and u]
        rec.url = uris[0] if uris else None
        for i, extra in enumerate(uris[1:], start=2):
            rec.plain[f"url{i}"] = extra
    elif kind == "card":
        card = item.get("card") or {}
        for k in ("cardholderName", "brand", "expMonth", "expYear"):
            if _s(card.get(k)):
                rec.plain[k] = str(_s(card.get(k)))
        for k in ("number", "code"):
            if _s(card.get(k)):
                rec.secret[k] = str(_s(card.get(k)))
    elif kind == "identity":
        ident = item.get("identity") or {}
        for k, v in ident.items():
            if _s(v):
                target = (
                    rec.secret if k in ("ssn", "passportNumber", "licenseNumber") else rec.plain
                )
                target[k] = str(_s(v))
    elif kind == "ssh_key":
        ssh = item.get("sshKey") or {}
        if _s(ssh.get("privateKey")):
            rec.secret["private_key"] = str(ssh["privateKey"])
        if _s(ssh.get("publicKey")):
            rec.plain["public_key"] = str(ssh["publicKey"])
    for f in item.get("fields") or []:
        name, value = _s(f.get("name")) or "field", _s(f.get("value"))
        if value is None or f.get("type") == 3:  # 3: linked field, no value of its own
            continue
        if not (name.lower() in ("totp", "otp") and rec.take_totp(value)):
            rec.put(name, value, secret=f.get("type") == 1)  # 1: hidden
    return rec


def load(path: Path, ctx: ImportContext) -> Loaded:
    try:
        doc = json.loads(read_text(path))
    except ValueError as exc:
        raise InvalidParameters("not a Bitwarden JSON export (the file is not JSON)") from exc
    if not isinstance(doc, dict):
        raise InvalidParameters("not a Bitwarden JSON export")
    if doc.get("encrypted") is True:
        if doc.get("passwordProtected") is not True:
            raise InvalidParameters(
                "this is an account-restricted Bitwarden export; only that account can read it",
                hint='export again from Bitwarden choosing "password protected" or plain JSON',
            )
        password = ctx.source_password("Bitwarden export password")
        doc = decrypt_export(doc, password.get_secret_value())
    if not isinstance(doc.get("items"), list):
        raise InvalidParameters("not a Bitwarden JSON export (no items)")
    folders = {
        str(f.get("id")): str(f.get("name"))
        for f in doc.get("folders") or doc.get("collections") or []
        if isinstance(f, dict) and f.get("id") and f.get("name")
    }
    out = Loaded()
    for item in doc["items"]:
        try:
            rec = _item(item, folders) if isinstance(item, dict) else None
        except (AttributeError, TypeError) as exc:
            out.failed.append(("(item)", f"unreadable item ({type(exc).__name__})"))
            continue
        if rec is not None:
            out.records.append(rec)
    return out
