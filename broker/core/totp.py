"""TOTP seeds: parsing `otpauth://` URIs, validating seeds, and computing codes with pyotp.

pyotp 2.12 refuses seeds shorter than 112 bits, but most real-world seeds (Google
Authenticator style, 16 base32 characters) are 80 bits and the person cannot change the seed
a service issued. We accept seeds of at least 80 bits (the RFC 4226 example length) and refuse
shorter ones at `add` with a clear message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pyotp

from broker.wire.errors import InvalidParameters

MIN_SEED_BYTES = 10
ALGORITHMS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}


class _TOTP(pyotp.TOTP):
    def byte_secret(self) -> bytes:
        return decode_seed(self.secret)


def decode_seed(seed: str) -> bytes:
    s = seed.replace(" ", "").replace("-", "").upper()
    s += "=" * (-len(s) % 8)
    try:
        raw = base64.b32decode(s, casefold=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidParameters(
            "totp secret is not valid base32", data={"field": "secret"}
        ) from exc
    if len(raw) < MIN_SEED_BYTES:
        raise InvalidParameters(
            "totp secret is shorter than 80 bits",
            hint="check that the whole secret was copied",
            data={"field": "secret"},
        )
    return raw


@dataclass(frozen=True)
class TotpSpec:
    secret: str
    digits: int = 6
    period: int = 30
    algorithm: str = "SHA1"
    issuer: str | None = None
    account: str | None = None


def parse(value: str) -> TotpSpec:
    """A bare base32 seed or an `otpauth://totp/...` URI."""
    value = value.strip()
    if not value.lower().startswith("otpauth://"):
        decode_seed(value)
        return TotpSpec(secret=value.replace(" ", "").upper())
    url = urlparse(value)
    if url.netloc.lower() != "totp":
        raise InvalidParameters("only otpauth://totp URIs are supported", data={"field": "secret"})
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    label = unquote(url.path.lstrip("/"))
    issuer, _, account = label.rpartition(":") if ":" in label else ("", "", label)
    spec = TotpSpec(
        secret=query.get("secret", "").replace(" ", "").upper(),
        digits=_int(query.get("digits", "6"), "digits"),
        period=_int(query.get("period", "30"), "period"),
        algorithm=query.get("algorithm", "SHA1").upper(),
        issuer=query.get("issuer") or issuer or None,
        account=account or None,
    )
    validate(spec)
    return spec


def _int(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidParameters(f"totp {name} must be a number", data={"field": name}) from exc


def validate(spec: TotpSpec) -> None:
    decode_seed(spec.secret)
    if not 6 <= spec.digits <= 10:
        raise InvalidParameters("totp digits must be between 6 and 10", data={"field": "digits"})
    if not 1 <= spec.period <= 120:
        raise InvalidParameters("totp period must be 1..120 seconds", data={"field": "period"})
    if spec.algorithm not in ALGORITHMS:
        raise InvalidParameters(
            "totp algorithm must be SHA1, SHA256 or SHA512", data={"field": "algorithm"}
        )


def code(spec: TotpSpec, now: float | None = None) -> tuple[str, int]:
    """The current code and the seconds it remains valid."""
    now = time.time() if now is None else now
    otp: Any = _TOTP(
        spec.secret,
        digits=spec.digits,
        interval=spec.period,
        digest=ALGORITHMS[spec.algorithm],
    )
    remaining = spec.period - int(now) % spec.period
    return str(otp.at(now)), remaining
