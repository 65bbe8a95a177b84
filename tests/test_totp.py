"""TOTP: 80-bit seeds, otpauth URIs, RFC 6238 vectors, and codes from vault entries."""

from __future__ import annotations

import base64
import hmac
import struct
from collections.abc import Callable
from pathlib import Path

import pyotp
import pytest

from broker.core import totp
from broker.core.crypto import KdfParams, normalize_password
from broker.core.totp import TotpSpec
from broker.core.vault import Change, Vault
from broker.wire.errors import ApmError

from .conftest import PASSWORD

SEED_80 = "JBSWY3DPEHPK3PXP"  # 10 bytes: b"Hello!\xde\xad\xbe\xef"


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(ApmError) as info:
        fn()
    return info.value.code


def rfc4226(key: bytes, counter: int, digits: int, digest: str = "sha1") -> str:
    """HOTP computed straight from RFC 4226 section 5.3, independent of pyotp."""
    mac = hmac.new(key, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    (value,) = struct.unpack(">I", mac[offset : offset + 4])
    return str((value & 0x7FFFFFFF) % 10**digits).zfill(digits)


def b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


# ---------------------------------------------------------------------- 80-bit seeds


@pytest.mark.parametrize("now", [0, 59, 1_111_111_109, 1_700_000_000, 2_000_000_000])
def test_an_80_bit_seed_produces_the_rfc_code(now: int) -> None:
    key = base64.b32decode(SEED_80)
    assert len(key) * 8 == 80
    got, _ = totp.code(TotpSpec(secret=SEED_80), now)
    assert got == rfc4226(key, now // 30, 6)


def test_an_80_bit_seed_agrees_with_pyotp_given_the_same_key() -> None:
    # pyotp refuses seeds under 112 bits; HMAC pads keys shorter than its block with
    # zeros, so the same key followed by zero bytes gives pyotp the identical MAC key.
    padded = b32(base64.b32decode(SEED_80) + bytes(10))
    reference = pyotp.TOTP(padded)
    for now in (59, 1_234_567_890, 1_763_730_000):
        assert totp.code(TotpSpec(secret=SEED_80), now)[0] == reference.at(now)


def test_seeds_are_accepted_with_spaces_dashes_and_lowercase() -> None:
    messy = "jbsw y3dp-ehpk 3pxp"
    assert totp.decode_seed(messy) == base64.b32decode(SEED_80)
    assert totp.decode_seed(totp.parse(messy).secret) == base64.b32decode(SEED_80)
    assert totp.code(totp.parse(messy), 59) == totp.code(TotpSpec(secret=SEED_80), 59)


@pytest.mark.parametrize(
    "seed",
    ["JBSWY3DPEHPK3PX", "JBSWY3DPEHPK", "JBSWY3DP", "", "A" * 8],
    ids=["75-bits", "60-bits", "40-bits", "empty", "40-bits-of-zeros"],
)
def test_a_seed_shorter_than_80_bits_is_refused(seed: str) -> None:
    assert code_of(lambda: totp.parse(seed)) == "INVALID_PARAMETERS"
    assert code_of(lambda: totp.validate(TotpSpec(secret=seed))) == "INVALID_PARAMETERS"


@pytest.mark.parametrize("seed", ["JBSWY3DPEHPK3PX1", "not base32 at all!"])
def test_a_seed_that_is_not_base32_is_refused(seed: str) -> None:
    assert code_of(lambda: totp.parse(seed)) == "INVALID_PARAMETERS"


def test_the_remaining_seconds_count_down_to_the_next_period() -> None:
    spec = TotpSpec(secret=SEED_80, period=30)
    assert totp.code(spec, 60)[1] == 30
    assert totp.code(spec, 89)[1] == 1
    assert totp.code(spec, 89.9)[0] == totp.code(spec, 60)[0]
    assert totp.code(spec, 90)[0] != totp.code(spec, 89)[0]


# ---------------------------------------------------------------------- otpauth URIs


def test_an_otpauth_uri_is_parsed_with_all_its_parameters() -> None:
    spec = totp.parse(
        "otpauth://totp/ACME%20Co:john.doe@example.com"
        f"?secret={SEED_80.lower()}&issuer=ACME%20Corp&digits=8&period=60&algorithm=sha256"
    )
    assert spec == TotpSpec(
        secret=SEED_80,
        digits=8,
        period=60,
        algorithm="SHA256",
        issuer="ACME Corp",
        account="john.doe@example.com",
    )


def test_an_otpauth_uri_takes_the_issuer_from_its_label_and_defaults_the_rest() -> None:
    spec = totp.parse(f"otpauth://totp/Example:alice@google.com?secret={SEED_80}")
    assert (spec.issuer, spec.account) == ("Example", "alice@google.com")
    assert (spec.digits, spec.period, spec.algorithm) == (6, 30, "SHA1")
    bare = totp.parse(f"otpauth://totp/alice?secret={SEED_80}")
    assert (bare.issuer, bare.account) == (None, "alice")


@pytest.mark.parametrize(
    "uri",
    [
        f"otpauth://hotp/x?secret={SEED_80}&counter=1",
        "otpauth://totp/x?secret=JBSWY3DP",
        "otpauth://totp/x",
        f"otpauth://totp/x?secret={SEED_80}&digits=4",
        f"otpauth://totp/x?secret={SEED_80}&digits=six",
        f"otpauth://totp/x?secret={SEED_80}&period=0",
        f"otpauth://totp/x?secret={SEED_80}&algorithm=MD5",
    ],
    ids=["hotp", "short-seed", "no-seed", "4-digits", "digits-nan", "period-0", "md5"],
)
def test_an_unusable_otpauth_uri_is_refused(uri: str) -> None:
    assert code_of(lambda: totp.parse(uri)) == "INVALID_PARAMETERS"


# ---------------------------------------------------------------------- RFC 6238 appendix B

RFC_SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC_VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]


@pytest.mark.parametrize(("now", "sha1", "sha256", "sha512"), RFC_VECTORS)
def test_the_rfc_6238_test_vectors(now: int, sha1: str, sha256: str, sha512: str) -> None:
    for algorithm, expected in (("SHA1", sha1), ("SHA256", sha256), ("SHA512", sha512)):
        spec = TotpSpec(secret=b32(RFC_SEEDS[algorithm]), digits=8, algorithm=algorithm)
        assert totp.code(spec, now)[0] == expected, algorithm


# ---------------------------------------------------------------------- vault entries


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault.create(
        tmp_path / "vault.apm", normalize_password(PASSWORD), KdfParams("test", 8 * 1024, 1, 1)
    )


def add_totp(vault: Vault, secret: str, name: str = "mfa") -> object:
    return vault.add("totp", name, "default", [], None, None, Change({}, {"secret": secret}, []))


def test_a_totp_entry_with_an_80_bit_seed_gives_the_rfc_code(vault: Vault) -> None:
    add_totp(vault, SEED_80.lower())
    entry = vault.resolve("mfa")
    assert vault.totp(entry, 59) == (rfc4226(base64.b32decode(SEED_80), 1, 6), 1, 30)


def test_a_totp_entry_from_an_otpauth_uri_keeps_its_parameters(vault: Vault) -> None:
    seed = b32(RFC_SEEDS["SHA512"])
    add_totp(vault, f"otpauth://totp/ACME:bob?secret={seed}&digits=8&algorithm=SHA512")
    entry = vault.resolve("mfa")
    plain = {k: f.value for k, f in entry.fields.items() if not f.secret}
    assert plain == {
        "digits": "8",
        "period": "30",
        "algorithm": "SHA512",
        "issuer": "ACME",
        "account": "bob",
    }
    assert vault.reveal(entry, "secret")[1] == seed  # the seed alone, not the whole URI
    assert vault.totp(entry, 1111111111)[0] == "99943326"


def test_a_totp_entry_with_a_short_seed_is_refused_and_not_added(vault: Vault) -> None:
    assert code_of(lambda: add_totp(vault, "JBSWY3DPEHPK")) == "INVALID_PARAMETERS"
    assert vault.entries == {}


def test_a_totp_code_for_an_entry_without_a_seed_is_refused(vault: Vault) -> None:
    entry = vault.add("login", "site", "default", [], None, None, Change({}, {"password": "p"}, []))
    assert code_of(lambda: vault.totp(entry, 59)) == "INVALID_PARAMETERS"
