"""The vault file format and its durable, atomic save.

Layout (all integers big-endian):

    magic        8   b"APMVAULT"
    version      2   format version (1)
    header_len   4   then `header_len` bytes of canonical JSON: KDF name/profile/params, salt
    keyblock_len 4   then the DEK wrapped under the password key: nonce || ct+tag
    payload_len  8   then the payload: nonce || AES-256-GCM(DEK) ciphertext+tag
    checksum    32   SHA-256 of every byte before it

The DEK wrap authenticates the header bytes (magic..header) as associated data, and the payload
authenticates everything before it, so an edited header or key block is refused by the
cryptography itself. The checksum is not a security control (anyone can recompute it): it lets
an accidental flipped byte be reported as damage rather than as a wrong password.

Rules:
- A failed open never writes to the file.
- A save is durable before it returns: temp file, fsync, rename, fsync the directory.
- The previous version is kept as `<vault>.bak`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.wire.errors import (
    StorageError,
    VaultBadMagic,
    VaultCorrupt,
    VaultNotFound,
    VaultTruncated,
    VaultUnsupportedVersion,
)

from .crypto import KDF_BOUNDS, SALT_BYTES, KdfParams

MAGIC = b"APMVAULT"
FORMAT_VERSION = 1
_CHECKSUM = 32
MAX_VAULT_BYTES = 4 << 30


@dataclass(frozen=True)
class Header:
    kdf: KdfParams
    salt: bytes

    def encode(self) -> bytes:
        doc = {
            "kdf": {
                "name": "argon2id",
                "profile": self.kdf.profile,
                "memory_kib": self.kdf.memory_kib,
                "time_cost": self.kdf.time_cost,
                "parallelism": self.kdf.parallelism,
            },
            "salt": self.salt.hex(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        try:
            doc: Any = json.loads(raw)
            kdf = doc["kdf"]
            if kdf["name"] != "argon2id":
                raise VaultUnsupportedVersion(f"unknown key derivation function {kdf['name']!r}")
            params = KdfParams(
                profile=str(kdf["profile"]),
                memory_kib=int(kdf["memory_kib"]),
                time_cost=int(kdf["time_cost"]),
                parallelism=int(kdf["parallelism"]),
            )
            salt = bytes.fromhex(doc["salt"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise VaultCorrupt("vault header is unreadable") from exc
        for name, (lo, hi) in KDF_BOUNDS.items():
            if not lo <= getattr(params, name) <= hi:
                raise VaultCorrupt(f"vault header has out-of-range {name}")
        if len(salt) != SALT_BYTES:
            raise VaultCorrupt("vault header has a bad salt")
        return cls(kdf=params, salt=salt)


@dataclass(frozen=True)
class VaultBlob:
    header: Header
    header_bytes: bytes  # magic..header, the AD of the key wrap
    keyblock: bytes
    payload: bytes

    @property
    def payload_ad(self) -> bytes:
        return self.header_bytes + struct.pack(">I", len(self.keyblock)) + self.keyblock


def prefix(header: Header) -> bytes:
    raw = header.encode()
    return MAGIC + struct.pack(">HI", FORMAT_VERSION, len(raw)) + raw


def encode(header_bytes: bytes, keyblock: bytes, payload: bytes) -> bytes:
    body = (
        header_bytes
        + struct.pack(">I", len(keyblock))
        + keyblock
        + struct.pack(">Q", len(payload))
        + payload
    )
    return body + hashlib.sha256(body).digest()


def decode(data: bytes) -> VaultBlob:
    if len(data) < len(MAGIC):
        if MAGIC.startswith(data[: len(MAGIC)]) and data:
            raise VaultTruncated()
        raise VaultBadMagic()
    if data[:8] != MAGIC:
        raise VaultBadMagic()
    if len(data) < 14:
        raise VaultTruncated()
    version, hlen = struct.unpack(">HI", data[8:14])
    if version != FORMAT_VERSION:
        raise VaultUnsupportedVersion(
            f"vault format version {version} is not supported (this apm reads {FORMAT_VERSION})"
        )
    pos = 14
    need = pos + hlen + 4
    if len(data) < need:
        raise VaultTruncated()
    header_raw = data[pos : pos + hlen]
    pos += hlen
    header_bytes = data[:pos]
    (klen,) = struct.unpack(">I", data[pos : pos + 4])
    pos += 4
    if len(data) < pos + klen + 8:
        raise VaultTruncated()
    keyblock = data[pos : pos + klen]
    pos += klen
    (plen,) = struct.unpack(">Q", data[pos : pos + 8])
    pos += 8
    if len(data) < pos + plen + _CHECKSUM:
        raise VaultTruncated()
    payload = data[pos : pos + plen]
    pos += plen
    if len(data) != pos + _CHECKSUM:
        raise VaultCorrupt("vault file has trailing bytes")
    if hashlib.sha256(data[:pos]).digest() != data[pos:]:
        raise VaultCorrupt()
    header = Header.decode(header_raw)
    return VaultBlob(header=header, header_bytes=header_bytes, keyblock=keyblock, payload=payload)


def read(path: Path) -> VaultBlob:
    try:
        size = path.stat().st_size
        if size > MAX_VAULT_BYTES:
            raise VaultCorrupt("vault file is implausibly large")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise VaultNotFound(f"no vault at {path}") from exc
    except IsADirectoryError as exc:
        raise VaultBadMagic(f"{path} is a directory") from exc
    except PermissionError as exc:
        raise StorageError(f"cannot read {path}: permission denied") from exc
    return decode(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> int:
    """Delete temp files a crashed save left beside the vault (their writer pid is gone)."""
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else 0
        if pid and pid != os.getpid() and _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, data: bytes, *, keep_backup: bool = True) -> None:
    """Write `data` to `path` durably; the old file (if any) becomes `<path>.bak`."""
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    bak_tmp = directory / f".{path.name}.{os.getpid()}.bak.tmp"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_backup and path.exists():
            bak = path.with_name(path.name + ".bak")
            with contextlib.suppress(FileNotFoundError):
                bak_tmp.unlink()
            try:
                os.link(path, bak_tmp)  # the current version, without copying it
            except OSError:
                bak_tmp.write_bytes(path.read_bytes())
                os.chmod(bak_tmp, 0o600)
            os.replace(bak_tmp, bak)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as exc:
        for leftover in (tmp, bak_tmp):
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise StorageError(f"could not save {path.name}: {exc.strerror or exc}") from exc
