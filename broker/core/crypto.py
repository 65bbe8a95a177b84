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
from typing import Any

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

    def open_all(self, blobs: list[bytes], ads: list[bytes]) -> list[bytes]:
        """`open` of each blob with its AD, in one loop over one AEAD object (a vault unlock
        opens 100k records); any failure raises DecryptionFailed."""
        decrypt = self._get().decrypt
        n = NONCE_BYTES
        try:
            return [
                decrypt(b[:n], b[n:], ad) if len(b) >= n + 16 else _short()
                for b, ad in zip(blobs, ads, strict=True)
            ]
        except InvalidTag as exc:
            raise DecryptionFailed("authentication failed") from exc

    def close(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return "Cipher(<redacted>)"


# --- device keys for synced spaces (X25519 to receive space keys, Ed25519 to sign) ---------

_WRAP_INFO = b"apm.sync.v1.wrap"


def device_keypairs() -> tuple[bytearray, bytearray]:
    """A new device's raw private keys: (X25519 for key wrapping, Ed25519 for signing)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return bytearray(_raw_private(X25519PrivateKey.generate())), bytearray(
        _raw_private(Ed25519PrivateKey.generate())
    )


def _raw_private(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return raw


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return raw


def x25519_public(private: bytearray) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return _raw_public(X25519PrivateKey.from_private_bytes(bytes(private)))


def ed25519_public(private: bytearray) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return _raw_public(Ed25519PrivateKey.from_private_bytes(bytes(private)))


def sign(private: bytearray, message: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes(private)).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def wrap_to(recipient_public: bytes, key: bytearray, ad: bytes) -> bytes:
    """`key` sealed to one device: ephemeral X25519 with its public key, HKDF-SHA256 over the
    shared secret and both public keys, AES-256-GCM with `ad`. Blob: ephemeral pub || sealed."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    eph = X25519PrivateKey.generate()
    eph_pub = _raw_public(eph)
    shared = bytearray(eph.exchange(X25519PublicKey.from_public_bytes(recipient_public)))
    try:
        kek = bytearray(
            HKDF(
                algorithm=hashes.SHA256(),
                length=KEY_BYTES,
                salt=None,
                info=_WRAP_INFO + eph_pub + recipient_public,
            ).derive(bytes(shared))
        )
    finally:
        zero(shared)
    cipher = Cipher(kek)
    zero(kek)
    try:
        return eph_pub + cipher.seal(bytes(key), ad)
    finally:
        cipher.close()


def unwrap_from(private: bytearray, blob: bytes, ad: bytes) -> bytearray:
    """The key `wrap_to` sealed for this device; DecryptionFailed if it was not, or changed."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    if len(blob) < 32 + NONCE_BYTES + 16:
        raise DecryptionFailed("wrapped key too short")
    me = X25519PrivateKey.from_private_bytes(bytes(private))
    eph_pub = blob[:32]
    try:
        shared = bytearray(me.exchange(X25519PublicKey.from_public_bytes(eph_pub)))
    except ValueError as exc:
        raise DecryptionFailed("bad ephemeral key") from exc
    try:
        kek = bytearray(
            HKDF(
                algorithm=hashes.SHA256(),
                length=KEY_BYTES,
                salt=None,
                info=_WRAP_INFO + eph_pub + _raw_public(me),
            ).derive(bytes(shared))
        )
    finally:
        zero(shared)
    cipher = Cipher(kek)
    zero(kek)
    try:
        return bytearray(cipher.open(blob[32:], ad))
    finally:
        cipher.close()


def digest(data: bytes) -> bytes:
    """SHA-256, for fingerprints and one-time code hashes."""
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def mac(key: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hmac

    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def _short() -> bytes:
    raise DecryptionFailed("blob too short")
