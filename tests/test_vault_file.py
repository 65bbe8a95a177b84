"""The v1 vault file format: round trip, damage detection, tamper resistance and durable saves.

v1 vaults are made and reopened here as v1 (no migration), as apm 0.1.0 did; the v2 format
has its own tests (tests/test_vault_db.py).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.core import crypto, vault_file
from broker.core.crypto import KdfParams, normalize_password
from broker.core.vault import Change, Vault
from broker.core.vault_file import MAGIC
from broker.wire.errors import ApmError

from .conftest import PASSWORD

# Small enough to keep each derivation ~10 ms, inside the bounds a header may carry.
FAST = KdfParams("test", 8 * 1024, 1, 1)
DAMAGE = {"VAULT_CORRUPT", "VAULT_TRUNCATED"}
SECRET = "s3cret-value"


def create_v1(path: Path, password: bytearray, params: KdfParams) -> Vault:
    return Vault.create(path, password, params, format=1)


def open_v1(path: Path, password: bytearray) -> Vault:
    return Vault.open(path, password, migrate=False)


def pw(password: str = PASSWORD) -> bytearray:
    return normalize_password(password)


def add_login(vault: Vault, name: str, secret: str = SECRET) -> None:
    vault.add(
        "login",
        name,
        "default",
        [],
        None,
        None,
        Change(fields={"username": "alice"}, secrets={"password": secret}, remove_fields=[]),
    )


def names(vault: Vault) -> set[str]:
    return {e.name for e in vault.entries.values()}


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(ApmError) as info:
        fn()
    return info.value.code


@dataclass
class Layout:
    """Where each region of an encoded vault starts and ends."""

    data: bytes

    def __post_init__(self) -> None:
        (hlen,) = struct.unpack(">I", self.data[10:14])
        h_end = 14 + hlen
        (klen,) = struct.unpack(">I", self.data[h_end : h_end + 4])
        k_end = h_end + 4 + klen
        (plen,) = struct.unpack(">Q", self.data[k_end : k_end + 8])
        p_end = k_end + 8 + plen
        self.regions: dict[str, tuple[int, int]] = {
            "magic": (0, 8),
            "version": (8, 10),
            "header_len": (10, 14),
            "header": (14, h_end),
            "keyblock_len": (h_end, h_end + 4),
            "keyblock": (h_end + 4, k_end),
            "payload_len": (k_end, k_end + 8),
            "payload": (k_end + 8, p_end),
            "checksum": (p_end, p_end + 32),
        }
        assert p_end + 32 == len(self.data)

    def part(self, region: str) -> bytes:
        lo, hi = self.regions[region]
        return self.data[lo:hi]

    def rebuild(
        self,
        *,
        version: int = vault_file.FORMAT_VERSION,
        header: bytes | None = None,
        keyblock: bytes | None = None,
        payload: bytes | None = None,
    ) -> bytes:
        """Re-encode with some parts replaced and every length and the checksum recomputed."""
        raw = self.part("header") if header is None else header
        prefix = MAGIC + struct.pack(">HI", version, len(raw)) + raw
        return vault_file.encode(
            prefix,
            self.part("keyblock") if keyblock is None else keyblock,
            self.part("payload") if payload is None else payload,
        )

    def header_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.part("header"))
        return doc


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault.apm"


@pytest.fixture
def made(path: Path) -> Iterator[Vault]:
    vault = create_v1(path, pw(), FAST)
    add_login(vault, "github")
    yield vault
    vault.close()


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for p in sorted(directory.iterdir()):
        st = p.stat()
        out[p.name] = (p.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


# ---------------------------------------------------------------------- round trip


def test_a_created_vault_reopens_with_its_password_and_entries(made: Vault, path: Path) -> None:
    reopened = open_v1(path, pw())
    entry = reopened.resolve("github")
    assert reopened.reveal(entry, None) == ("password", SECRET)
    assert reopened.header == made.header
    assert reopened.spaces == ["default"]


def test_the_file_never_contains_a_secret_or_entry_name_in_the_clear(
    made: Vault, path: Path
) -> None:
    data = path.read_bytes()
    assert SECRET.encode() not in data
    assert b"github" not in data
    assert b"alice" not in data


def test_a_wrong_password_is_refused_as_bad_password(made: Vault, path: Path) -> None:
    assert code_of(lambda: open_v1(path, pw("correct horse battery stapl"))) == "BAD_PASSWORD"
    assert code_of(lambda: Vault.check_password_on_disk(path, pw("x"))) == "BAD_PASSWORD"


def test_the_password_is_compared_after_unicode_normalisation(path: Path) -> None:
    composed, decomposed = "caf\u00e9-pass", "cafe\u0301-pass"
    create_v1(path, pw(composed), FAST).close()
    open_v1(path, pw(decomposed)).close()


def test_a_missing_file_is_reported_as_vault_not_found(tmp_path: Path) -> None:
    assert code_of(lambda: open_v1(tmp_path / "nope.apm", pw())) == "VAULT_NOT_FOUND"


# ---------------------------------------------------------------------- damage


def test_a_truncated_file_is_reported_as_truncated_at_every_cut_point(
    made: Vault, path: Path
) -> None:
    data = path.read_bytes()
    for cut in range(1, len(data)):
        assert code_of(lambda cut=cut: vault_file.decode(data[:cut])) == "VAULT_TRUNCATED", cut


def test_a_truncated_file_on_disk_is_refused_before_any_key_derivation(
    made: Vault, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(path.read_bytes())
    monkeypatch.setattr(crypto, "derive_key", _no_derivation)
    for region, (lo, hi) in layout.regions.items():
        for cut in {lo + 1, (lo + hi) // 2, hi - 1} - {0}:
            path.write_bytes(layout.data[:cut])
            assert code_of(lambda: open_v1(path, pw())) == "VAULT_TRUNCATED", (region, cut)


def test_an_empty_file_is_refused(made: Vault, path: Path) -> None:
    path.write_bytes(b"")
    assert code_of(lambda: open_v1(path, pw())) in {"VAULT_TRUNCATED", "VAULT_BAD_MAGIC"}


@pytest.mark.parametrize("region", ["header", "keyblock", "payload", "checksum"])
def test_a_flipped_byte_in_a_region_is_reported_as_corrupt(
    made: Vault, path: Path, region: str
) -> None:
    layout = Layout(path.read_bytes())
    lo, hi = layout.regions[region]
    for offset in range(lo, hi):
        for mask in (0x01, 0x80):
            damaged = bytearray(layout.data)
            damaged[offset] ^= mask
            assert code_of(lambda d=bytes(damaged): vault_file.decode(d)) == "VAULT_CORRUPT"
            if offset in (lo, (lo + hi) // 2, hi - 1):  # and through a real open from disk
                path.write_bytes(damaged)
                assert code_of(lambda: open_v1(path, pw())) == "VAULT_CORRUPT", offset


@pytest.mark.parametrize("region", ["header_len", "keyblock_len", "payload_len"])
def test_a_flipped_byte_in_a_length_field_is_reported_as_damage(
    made: Vault, path: Path, region: str
) -> None:
    layout = Layout(path.read_bytes())
    lo, hi = layout.regions[region]
    for offset in range(lo, hi):
        for mask in (0x01, 0x02, 0x10, 0x80):
            damaged = bytearray(layout.data)
            damaged[offset] ^= mask
            assert code_of(lambda d=bytes(damaged): vault_file.decode(d)) in DAMAGE, offset


def test_trailing_bytes_after_the_checksum_are_reported_as_corrupt(made: Vault, path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\x00")
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_CORRUPT"


@pytest.mark.parametrize(
    "content",
    [b"APMVAULX" + b"\x00" * 64, b"hello world\n", b'{"vault": 1}', b"\x00" * 200],
    ids=["near-magic", "text", "json", "zeros"],
)
def test_a_file_without_the_magic_is_not_a_vault(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_BAD_MAGIC"


def test_a_directory_at_the_vault_path_is_not_a_vault(path: Path) -> None:
    path.mkdir()
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_BAD_MAGIC"


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_an_unknown_format_version_is_refused(made: Vault, path: Path, version: int) -> None:
    path.write_bytes(Layout(path.read_bytes()).rebuild(version=version))
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_UNSUPPORTED_VERSION"


def test_an_unknown_key_derivation_function_is_refused(made: Vault, path: Path) -> None:
    layout = Layout(path.read_bytes())
    doc = layout.header_doc()
    doc["kdf"]["name"] = "scrypt"
    path.write_bytes(layout.rebuild(header=json.dumps(doc).encode()))
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_UNSUPPORTED_VERSION"


# ---------------------------------------------------------------------- tampering


def _edit_kdf(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["kdf"].update(changes)

    return edit


def _new_salt(doc: dict[str, Any]) -> None:
    doc["salt"] = bytes(16).hex()


HEADER_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "lower-memory": _edit_kdf(memory_kib=8 * 1024),
    "lower-time-cost": _edit_kdf(time_cost=1),
    "other-salt": _new_salt,
    # Same KDF inputs, so the same key: only the associated data can catch these.
    "relabel-profile": _edit_kdf(profile="hardened"),
    "reformat-json": lambda doc: None,
}


@pytest.mark.parametrize("edit", HEADER_EDITS.values(), ids=HEADER_EDITS.keys())
def test_an_edited_header_with_a_recomputed_checksum_is_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    path = tmp_path / "vault.apm"
    create_v1(path, pw(), crypto.PROFILES["interactive"]).close()
    layout = Layout(path.read_bytes())
    doc = layout.header_doc()
    edit(doc)
    raw = json.dumps(doc, indent=1).encode()  # other bytes even when the meaning is unchanged
    assert raw != layout.part("header")
    path.write_bytes(layout.rebuild(header=raw))
    vault_file.read(path)  # the file is well formed: the checksum does not catch the edit
    assert code_of(lambda: open_v1(path, pw())) in {"BAD_PASSWORD", "VAULT_CORRUPT"}


def test_an_edited_keyblock_with_a_recomputed_checksum_is_refused(made: Vault, path: Path) -> None:
    layout = Layout(path.read_bytes())
    keyblock = bytearray(layout.part("keyblock"))
    keyblock[-1] ^= 0x01
    path.write_bytes(layout.rebuild(keyblock=bytes(keyblock)))
    assert code_of(lambda: open_v1(path, pw())) == "BAD_PASSWORD"


def test_an_edited_payload_with_a_recomputed_checksum_is_refused(made: Vault, path: Path) -> None:
    layout = Layout(path.read_bytes())
    payload = bytearray(layout.part("payload"))
    payload[20] ^= 0x01
    path.write_bytes(layout.rebuild(payload=bytes(payload)))
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_CORRUPT"


def test_a_payload_spliced_from_another_vault_is_refused(
    made: Vault, path: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.apm"
    create_v1(other, pw(), FAST).close()
    layout = Layout(path.read_bytes())
    path.write_bytes(layout.rebuild(payload=Layout(other.read_bytes()).part("payload")))
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_CORRUPT"


def _no_derivation(*args: object) -> bytearray:
    raise AssertionError("a key was derived from a header that should have been refused")


OUT_OF_RANGE: dict[str, Callable[[dict[str, Any]], None]] = {
    "memory-8GiB": _edit_kdf(memory_kib=8 * 1024 * 1024),
    "memory-1MiB": _edit_kdf(memory_kib=1024),
    "time-cost-0": _edit_kdf(time_cost=0),
    "time-cost-100000": _edit_kdf(time_cost=100_000),
    "parallelism-0": _edit_kdf(parallelism=0),
    "parallelism-1000": _edit_kdf(parallelism=1000),
    "memory-not-a-number": _edit_kdf(memory_kib="lots"),
    "memory-missing": lambda doc: doc["kdf"].pop("memory_kib"),
    "short-salt": lambda doc: doc.update(salt="00" * 8),
    "salt-not-hex": lambda doc: doc.update(salt="zz" * 16),
    "kdf-not-an-object": lambda doc: doc.update(kdf="argon2id"),
}


@pytest.mark.parametrize("edit", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_out_of_range_kdf_params_are_refused_without_deriving_a_key(
    made: Vault, path: Path, monkeypatch: pytest.MonkeyPatch, edit: Callable[[dict[str, Any]], None]
) -> None:
    layout = Layout(path.read_bytes())
    doc = layout.header_doc()
    edit(doc)
    path.write_bytes(layout.rebuild(header=json.dumps(doc).encode()))
    monkeypatch.setattr(crypto, "derive_key", _no_derivation)
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_CORRUPT"


@pytest.mark.parametrize(
    "header",
    [b"[]", b"null", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000],
    ids=["list", "null", "not-utf8", "deeply-nested"],
)
def test_an_unreadable_header_with_a_recomputed_checksum_is_reported_as_corrupt(
    made: Vault, path: Path, header: bytes
) -> None:
    path.write_bytes(Layout(path.read_bytes()).rebuild(header=header))
    assert code_of(lambda: open_v1(path, pw())) == "VAULT_CORRUPT"


# ---------------------------------------------------------------------- failed opens


def _damage_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    ("damage", "password", "expected"),
    [
        (None, "wrong password", "BAD_PASSWORD"),
        (_damage_payload, PASSWORD, "VAULT_CORRUPT"),
        (_truncate, PASSWORD, "VAULT_TRUNCATED"),
    ],
    ids=["wrong-password", "corrupt", "truncated"],
)
def test_a_failed_open_never_modifies_the_file(
    made: Vault,
    path: Path,
    damage: Callable[[Path], None] | None,
    password: str,
    expected: str,
) -> None:
    if damage is not None:
        damage(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an mtime a rewrite could not keep
    before = snapshot(path.parent)
    assert code_of(lambda: open_v1(path, pw(password))) == expected
    assert code_of(lambda: Vault.check_password_on_disk(path, pw(password))) == expected
    assert snapshot(path.parent) == before


# ---------------------------------------------------------------------- saves


def test_a_saved_vault_and_its_backup_are_readable_only_by_the_owner(
    made: Vault, path: Path
) -> None:
    old_umask = os.umask(0)
    try:
        add_login(made, "gitlab")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("vault.apm.bak").stat().st_mode) == 0o600


def test_a_save_creates_a_missing_directory_private(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "vault.apm"
    create_v1(path, pw(), FAST).close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_the_previous_version_is_kept_as_bak_and_opens(made: Vault, path: Path) -> None:
    add_login(made, "gitlab")
    bak = open_v1(path.with_name("vault.apm.bak"), pw())
    assert names(bak) == {"github"}
    assert names(open_v1(path, pw())) == {"github", "gitlab"}


def test_the_backup_is_copied_when_hard_links_are_unavailable(
    made: Vault, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*args: object, **kw: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    add_login(made, "gitlab")
    bak = path.with_name("vault.apm.bak")
    assert names(open_v1(bak, pw())) == {"github"}
    assert stat.S_IMODE(bak.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["vault.apm", "vault.apm.bak"]


def test_saves_leave_no_temporary_files_behind(made: Vault, path: Path) -> None:
    for i in range(3):
        add_login(made, f"site-{i}")
    made.space_add("work")
    made.rewrap(pw("new password"), FAST)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vault.apm", "vault.apm.bak"]


def test_rewrap_with_a_new_password_keeps_every_entry_and_retires_the_old_one(
    made: Vault, path: Path
) -> None:
    add_login(made, "gitlab", secret="second-secret")
    made.space_add("work")
    made.rewrap(pw("a new passphrase"), FAST)

    assert code_of(lambda: open_v1(path, pw())) == "BAD_PASSWORD"
    assert code_of(lambda: made.check_password(pw())) == "BAD_PASSWORD"
    made.check_password(pw("a new passphrase"))
    reopened = open_v1(path, pw("a new passphrase"))
    assert names(reopened) == {"github", "gitlab"}
    assert reopened.spaces == ["default", "work"]
    assert reopened.reveal(reopened.resolve("gitlab"), None)[1] == "second-secret"


def test_rewrap_to_another_profile_records_the_new_kdf_params(made: Vault, path: Path) -> None:
    old_salt = made.header.salt
    made.rewrap(pw(), crypto.PROFILES["interactive"])
    reopened = open_v1(path, pw())
    assert reopened.header.kdf == crypto.PROFILES["interactive"]
    assert reopened.header.salt != old_salt
    assert names(reopened) == {"github"}


# ---------------------------------------------------------------------- failed saves


def _fail_nth(monkeypatch: pytest.MonkeyPatch, name: str, n: int) -> None:
    """Make the n-th call (1-based) of os.<name> raise ENOSPC; other calls pass through."""
    real = getattr(os, name)
    calls = 0

    def failing(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(os, name, failing)


# A save with a previous version calls os.replace twice: the backup, then the vault.
FAILURES = {
    "write": ("write", 1),
    "fsync": ("fsync", 1),
    "replace-backup": ("replace", 1),
    "replace-vault": ("replace", 2),
    "open-temp": ("open", 1),
}


@pytest.mark.parametrize(("name", "n"), FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_save_raises_storage_error_and_changes_nothing(
    made: Vault, path: Path, monkeypatch: pytest.MonkeyPatch, name: str, n: int
) -> None:
    entries_before = dict(made.entries)
    on_disk = path.read_bytes()
    _fail_nth(monkeypatch, name, n)
    assert code_of(lambda: add_login(made, "gitlab")) == "STORAGE_ERROR"
    monkeypatch.undo()

    assert made.entries == entries_before
    assert code_of(lambda: made.resolve("gitlab")) == "ENTRY_NOT_FOUND"
    assert path.read_bytes() == on_disk
    assert sorted(p.name for p in path.parent.iterdir()) in (
        ["vault.apm"],
        ["vault.apm", "vault.apm.bak"],
    )
    add_login(made, "gitlab")  # the name index was not left claiming the failed entry
    assert names(open_v1(path, pw())) == {"github", "gitlab"}


def test_a_failed_rewrap_keeps_the_old_password_in_memory_and_on_disk(
    made: Vault, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header_before = made.header
    _fail_nth(monkeypatch, "replace", 2)
    assert code_of(lambda: made.rewrap(pw("new password"), FAST)) == "STORAGE_ERROR"
    monkeypatch.undo()

    assert made.header == header_before
    made.check_password(pw())
    assert code_of(lambda: made.check_password(pw("new password"))) == "BAD_PASSWORD"
    add_login(made, "gitlab")  # later saves still use the old key wrap
    assert names(open_v1(path, pw())) == {"github", "gitlab"}
