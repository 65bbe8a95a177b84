"""The unlocked vault held in memory, with its idle and hard auto-lock timers.

Rules:
- Time is injected (`monotonic`), so expiry is testable without sleeping.
- Locking closes the vault: the DEK bytearray is zeroed and decrypted state dropped. Every
  way it locks (a command, a timer found expired by any call, a shutdown) runs `on_lock`, so
  state kept beside the vault (the broker's transactions) is dropped with it.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from broker.wire.errors import VaultLocked

from .libc import libc
from .vault import Vault


@dataclass(frozen=True)
class LockPolicy:
    idle: timedelta = timedelta(minutes=30)
    hard: timedelta = timedelta(hours=12)


def _mlock(buf: bytearray) -> bool:
    """Best effort: keep the key's pages out of swap."""
    try:
        lib = libc()
        if lib is None:
            return False
        arr = (ctypes.c_char * len(buf)).from_buffer(buf)
        return int(lib.mlock(ctypes.addressof(arr), ctypes.c_size_t(len(buf)))) == 0
    except (OSError, AttributeError, TypeError, ValueError):
        return False


class OpenVault:
    """The open (unlocked) vault and its data key, held in memory until a lock or a timer."""

    def __init__(
        self,
        policy: LockPolicy,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.policy = policy
        self._mono = monotonic
        self._wall = wall
        self._vault: Vault | None = None
        self._unlocked_mono = 0.0
        self._last_used_mono = 0.0
        self.unlocked_at: datetime | None = None
        self.mlocked = False
        self.on_lock: Callable[[], object] | None = None  # after the vault is closed

    @property
    def unlocked(self) -> bool:
        self.expire()
        return self._vault is not None

    def put(self, vault: Vault) -> None:
        self.lock()
        self._vault = vault
        self.mlocked = _mlock(vault._dek)
        self._unlocked_mono = self._last_used_mono = self._mono()
        self.unlocked_at = self._wall()

    def peek(self) -> Vault | None:
        """The vault if unlocked, without counting as use."""
        self.expire()
        return self._vault

    def get(self) -> Vault:
        """The vault for a request; counts as activity for the idle timer.

        `expire` inlined (this runs several times per tool call): one clock read, locked when
        either timer ran out, exactly as `seconds_to_lock() <= 0`."""
        vault = self._vault
        if vault is None:
            raise VaultLocked()
        now = self._mono()
        policy = self.policy
        if (
            self._last_used_mono + policy.idle.total_seconds() - now <= 0
            or self._unlocked_mono + policy.hard.total_seconds() - now <= 0
        ):
            self.lock()
            raise VaultLocked()
        self._last_used_mono = now
        return vault

    def lock(self) -> bool:
        vault, self._vault = self._vault, None
        self.unlocked_at = None
        if vault is None:
            return False
        try:
            vault.close()
        finally:
            if self.on_lock is not None:
                self.on_lock()
        return True

    def seconds_to_lock(self) -> float | None:
        if self._vault is None:
            return None
        now = self._mono()
        idle_left = self._last_used_mono + self.policy.idle.total_seconds() - now
        hard_left = self._unlocked_mono + self.policy.hard.total_seconds() - now
        return max(0.0, min(idle_left, hard_left))

    def expire(self) -> bool:
        """Lock if a timer ran out. Returns True when this call locked the vault."""
        left = self.seconds_to_lock()
        if left is not None and left <= 0:
            return self.lock()
        return False

    def lock_times(self) -> tuple[datetime, datetime] | None:
        if self._vault is None:
            return None
        now_mono, now = self._mono(), self._wall()
        idle_at = now + timedelta(
            seconds=self._last_used_mono + self.policy.idle.total_seconds() - now_mono
        )
        hard_at = now + timedelta(
            seconds=self._unlocked_mono + self.policy.hard.total_seconds() - now_mono
        )
        return idle_at, hard_at


KeyCache = OpenVault  # the old name, for code written before the rename
