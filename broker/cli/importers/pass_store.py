"""`pass` (the standard unix password manager) stores: a directory of gpg-encrypted files.

Each `NAME.gpg` decrypts (through the person's gpg and gpg-agent) to the password on the
first line, then optional `key: value` lines (login/user/username/email, url, otpauth://...
from pass-otp) and free text (notes). The path below the store becomes the entry's name's
folder tag; FILE may be the store directory or a sub-directory of it.

Rules:
- gpg's plaintext arrives on a pipe and stays in this process; never a temp file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from broker.wire.errors import ExternalToolMissing, InvalidParameters

from . import ImportContext, Loaded, Record, totp_of

USER_KEYS = ("login", "username", "user", "email")
URL_KEYS = ("url", "website", "site")
GPG_TIMEOUT = 60.0


def parse(name: str, folder: str | None, text: str) -> Record:
    lines = text.splitlines()
    rec = Record(name=name, folder=folder, password=lines[0] if lines else None)
    notes: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.lower().startswith("otpauth://") and rec.totp is None and totp_of(stripped):
            rec.totp = totp_of(stripped)
            continue
        key, sep, value = stripped.partition(":")
        k = key.strip().lower()
        if sep and value.strip() and k in USER_KEYS and rec.username is None:
            rec.username = value.strip()
        elif sep and value.strip() and k in URL_KEYS and rec.url is None:
            rec.url = value.strip()
        elif sep and k in ("otp", "totp") and totp_of(value.strip()):
            rec.totp = rec.totp or totp_of(value.strip())
        else:
            notes.append(line)
    rec.notes = "\n".join(notes).strip("\n") or None
    return rec


def load(path: Path, ctx: ImportContext) -> Loaded:
    if not path.is_dir():
        raise InvalidParameters(
            "a pass import reads a store directory",
            hint="e.g. apm import pass ~/.password-store",
        )
    gpg = shutil.which("gpg") or shutil.which("gpg2")
    if gpg is None:
        raise ExternalToolMissing("gpg is not installed", hint="install gnupg")
    out = Loaded()
    files = sorted(p for p in path.rglob("*.gpg") if ".git" not in p.relative_to(path).parts)
    for f in files:
        rel = f.relative_to(path).with_suffix("")
        name = rel.name
        folder = rel.parent.as_posix() if rel.parent.as_posix() != "." else None
        try:
            proc = subprocess.run(
                [gpg, "--batch", "--quiet", "--yes", "--decrypt", str(f)],
                capture_output=True,
                timeout=GPG_TIMEOUT,
                check=False,
                env={**os.environ, "LC_ALL": "C"},
            )
        except (OSError, subprocess.TimeoutExpired):
            out.failed.append((rel.as_posix(), "gpg did not finish"))
            continue
        if proc.returncode != 0:
            out.failed.append(
                (rel.as_posix(), f"gpg could not decrypt it (exit {proc.returncode})")
            )
            continue
        try:
            text = proc.stdout.decode()
        except UnicodeDecodeError:
            out.failed.append((rel.as_posix(), "not UTF-8 text"))
            continue
        rec = parse(name, folder, text)
        if not rec.password and not rec.totp:
            out.failed.append((rel.as_posix(), "empty"))
            continue
        out.records.append(rec)
    if not files:
        raise InvalidParameters(f"no .gpg files under {path}", hint="is this a pass store?")
    return out
