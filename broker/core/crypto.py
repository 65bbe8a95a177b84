"""Key derivation and authenticated encryption: the only module that imports crypto libraries.

Rules:
- Every Argon2id derivation runs under one process-wide lock: concurrent derivations
  multiply peak memory (256 MiB each for `hardened`) and hang some libraries (FACTS.md).
- Keys live in `bytearray`s so they can be zeroed; callers zero what they own.
- Passwords are NFC-normalised so the same password typed on different systems matches.
"""

from __future__ import annotations

import os
import threading
import unicodedata
from dataclasses import dataclass

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
SALT_BYTES = 16


@dataclass(frozen=True)
class KdfParams:
    profile: str
    memory_kib: int
    time_cost: int
    parallelism: int


PROFILES: dict[str, KdfParams] = {
    "interactive": KdfParams("interactive", 19 * 1024, 2, 1),
    "standard": KdfParams("standard", 64 * 1024, 3, 2),
    "hardened": KdfParams("hardened", 256 * 1024, 5, 4),
}

# Parameters outside these bounds are refused when reading a header, so an edited header
# cannot make the broker allocate unbounded memory or spin forever.
KDF_BOUNDS = {
    "memory_kib": (8 * 1024, 4 * 1024 * 1024),
    "time_cost": (1, 64),
    "parallelism": (1, 64),
}

_kdf_lock = threading.Lock()


class DecryptionFailed(Exception):
    """AEAD authentication failed: wrong key, or the data or its associated data changed."""


def normalize_password(password: str) -> bytearray:
    return bytearray(unicodedata.normalize("NFC", password).encode("utf-8"))


def derive_key(password: bytearray, salt: bytes, params: KdfParams) -> bytearray:
    with _kdf_lock:
        raw = hash_secret_raw(
            bytes(password),
            salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=KEY_BYTES,
            type=Type.ID,
        )
    return bytearray(raw)


def hkdf(key: bytearray, info: bytes) -> bytes:
    """A 256-bit subkey for one purpose; one-way: it never reveals `key`."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(key))


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def new_key() -> bytearray:
    return bytearray(os.urandom(KEY_BYTES))


def zero(buf: bytearray) -> None:
    for i in range(len(buf)):
        buf[i] = 0


class Cipher:
    """AES-256-GCM under one key; blobs are nonce || ciphertext+tag, fresh nonce each seal."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytearray) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("key must be 32 bytes")
        self._aead: AESGCM | None = AESGCM(bytes(key))

    def _get(self) -> AESGCM:
        if self._aead is None:
            raise DecryptionFailed("cipher closed")
        return self._aead

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._get().encrypt(nonce, plaintext, ad)

    def open(self, blob: bytes, ad: bytes) -> bytes:
        if len(blob) < NONCE_BYTES + 16:
            raise DecryptionFailed("blob too short")
        try:
            return self._get().decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
        except InvalidTag as exc:
            raise DecryptionFailed("authentication failed") from exc

    def close(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return "Cipher(<redacted>)"
