"""The key cache: idle and hard auto-lock on an injected clock, and zeroing the key on lock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from broker.core import crypto
from broker.core.crypto import KdfParams
from broker.core.key_cache import LockPolicy, OpenVault
from broker.core.vault import Payload, Vault
from broker.core.vault_file import Header
from broker.wire.errors import ApmError

IDLE = 60.0
HARD = 600.0
POLICY = LockPolicy(idle=timedelta(seconds=IDLE), hard=timedelta(seconds=HARD))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def open_vault(tmp_path: Path) -> Vault:
    """An in-memory vault with a random key; no key derivation, nothing written."""
    header = Header(kdf=KdfParams("test", 8 * 1024, 1, 1), salt=bytes(16))
    return Vault(tmp_path / "vault.apm", header, b"", crypto.new_key(), Payload())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> OpenVault:
    return OpenVault(POLICY, monotonic=clock)


def assert_locked(cache: OpenVault) -> None:
    with pytest.raises(ApmError) as info:
        cache.get()
    assert info.value.code == "VAULT_LOCKED"
    assert not cache.unlocked
    assert cache.peek() is None
    assert cache.seconds_to_lock() is None


def test_a_new_cache_is_locked(cache: OpenVault) -> None:
    assert_locked(cache)
    assert cache.lock() is False


def test_the_vault_locks_after_the_idle_time_without_use(
    cache: OpenVault, clock: Clock, tmp_path: Path
) -> None:
    vault = open_vault(tmp_path)
    cache.put(vault)
    clock.advance(IDLE - 1)
    assert cache.seconds_to_lock() == pytest.approx(1)
    assert cache.get() is vault
    clock.advance(IDLE - 0.001)
    assert cache.get() is vault  # the previous get() restarted the idle timer
    clock.advance(IDLE)
    assert_locked(cache)


def test_peeking_does_not_count_as_use(cache: OpenVault, clock: Clock, tmp_path: Path) -> None:
    cache.put(open_vault(tmp_path))
    clock.advance(IDLE - 1)
    assert cache.peek() is not None
    assert cache.unlocked
    clock.advance(1)
    assert_locked(cache)


def test_the_vault_locks_at_the_hard_limit_even_while_in_use(
    cache: OpenVault, clock: Clock, tmp_path: Path
) -> None:
    vault = open_vault(tmp_path)
    cache.put(vault)
    while clock.now + IDLE / 2 < 1000.0 + HARD:
        clock.advance(IDLE / 2)
        assert cache.get() is vault
    assert cache.seconds_to_lock() == pytest.approx(1000.0 + HARD - clock.now)
    clock.advance(1000.0 + HARD - clock.now)
    assert_locked(cache)


def test_expiry_zeroes_the_key_of_the_locked_vault(
    cache: OpenVault, clock: Clock, tmp_path: Path
) -> None:
    vault = open_vault(tmp_path)
    dek = vault._dek
    assert any(dek)
    cache.put(vault)
    clock.advance(IDLE)
    assert cache.expire() is True
    assert dek == bytearray(crypto.KEY_BYTES)
    assert vault.entries == {}


def test_lock_zeroes_the_key_and_drops_the_vault(cache: OpenVault, tmp_path: Path) -> None:
    vault = open_vault(tmp_path)
    dek = vault._dek
    assert any(dek)
    cache.put(vault)
    assert cache.lock() is True
    assert len(dek) == crypto.KEY_BYTES
    assert dek == bytearray(crypto.KEY_BYTES)
    assert cache.unlocked_at is None
    assert_locked(cache)


def test_putting_a_new_vault_zeroes_the_previous_key(cache: OpenVault, tmp_path: Path) -> None:
    first, second = open_vault(tmp_path), open_vault(tmp_path)
    first_dek = first._dek
    cache.put(first)
    cache.put(second)
    assert first_dek == bytearray(crypto.KEY_BYTES)
    assert any(second._dek)
    assert cache.get() is second


def test_lock_times_report_the_earlier_idle_and_the_hard_deadline(
    cache: OpenVault, clock: Clock, tmp_path: Path
) -> None:
    cache.put(open_vault(tmp_path))
    clock.advance(10)
    times = cache.lock_times()
    assert times is not None
    idle_at, hard_at = times
    assert (hard_at - idle_at).total_seconds() == pytest.approx(HARD - IDLE)
