"""What the in-process broker tests share: a `State` with a real vault file and audit log on a
temporary directory (no socket, no process), a settable clock, and wire requests sent straight
to `dispatch.handle`. Each test module builds its own Twin around these with the fakes it is
about (process table, notifier, MCP host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from broker.core.audit import AuditLog
from broker.core.crypto import KdfParams, normalize_password
from broker.core.key_cache import LockPolicy, OpenVault
from broker.core.vault import Vault
from broker.paths import Paths
from broker.server import dispatch
from broker.server.peer import Peer
from broker.server.state import State
from broker.wire.protocol import Auth, Request, Response

FAST_KDF = KdfParams("test", 8 * 1024, 1, 1)  # the smallest a header accepts
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def twin_paths(root: Path) -> Paths:
    paths = Paths(
        vault=root / "vault.apm",
        config_dir=root / "config",
        state_dir=root / "state",
        runtime_dir=root / "run",
        broker_addr=f"ipc://{root}/run/broker.sock",
    )
    paths.state_dir.mkdir(parents=True)
    return paths


@contextlib.contextmanager
def broker_state(
    root: Path,
    password: str,
    *,
    audit_clock: Callable[[], datetime] | None = None,
    sign_audit: bool = True,
    seed: Callable[[Vault], object] | None = None,
    **state_kw: Any,
) -> Iterator[State]:
    """An unlocked State over a fresh vault under `root`; locked and closed on exit.

    `seed` fills the vault before the audit log opens; `sign_audit` gives the log its key now
    (as an unlock would); the other keywords go to `State` (clock, ancestry, host, throttle)."""
    paths = twin_paths(root)
    state = State(paths=paths, cache=OpenVault(LockPolicy()), **state_kw)
    vault = Vault.create(paths.vault, normalize_password(password), FAST_KDF)
    state.cache.put(vault)
    if seed is not None:
        seed(vault)
    audit_kw: dict[str, Any] = {"clock": audit_clock} if audit_clock is not None else {}
    state.audit = AuditLog(paths.state_dir / "audit.jsonl", **audit_kw)
    state.audit.open()
    if sign_audit:
        state.audit.key = vault.audit_key()
    try:
        yield state
    finally:
        state.cache.lock()
        state.kdf_pool.shutdown(wait=True)
        state.io_pool.shutdown(wait=True)
        state.audit.close()


def request_frame(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    password: str | None = None,
    agent: str | None = None,
) -> bytes:
    auth = None
    if token is not None or password is not None:
        auth = Auth(
            token=SecretStr(token) if token is not None else None,
            password=SecretStr(password) if password is not None else None,
            agent=agent,
        )
    return Request(v=1, method=method, params=params or {}, auth=auth).encode()


async def wire(
    state: State,
    peer: Peer,
    method: str,
    params: dict[str, Any] | None = None,
    **auth: Any,
) -> Response:
    """One wire request through the real dispatcher, as the transport would hand it over."""
    answer = await dispatch.handle(state, request_frame(method, params, **auth), peer)
    return Response.model_validate_json(answer)
