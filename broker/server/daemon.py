"""`apm-broker`: process entry point — hardening, config, socket, serve loop, auto-lock, signals.

Rules:
- Logs go to stderr and `<state dir>/broker.log` (0600) and never contain a secret.
- SIGTERM/SIGINT: lock, close the socket, remove the socket file, exit 0. The lock takes the
  write lock first (`_lock_for_shutdown`): a write in progress lands completely, one queued
  behind it finds the vault closed and answers VAULT_LOCKED.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from broker import __version__, paths
from broker.core.audit import AuditLog
from broker.core.key_cache import LockPolicy, OpenVault
from broker.wire.errors import ApmError, InvalidParameters
from broker.wire.relay import MCP_FRAME

from . import (
    approval_handlers,
    audit_handlers,
    dispatch,
    handlers,
    hardening,
    history_handlers,
    limits,
    mcp_routes,
    request_handlers,
    sd_notify,
    session_handlers,
    storage_handlers,
    sync_service,
    tx_handlers,
)
from .notify import EmailConfig, Notifier
from .peer import Peer
from .state import State
from .transport import Transport, ensure_private_dir

log = logging.getLogger("apm.broker")
_ = (
    approval_handlers,
    handlers,
    request_handlers,
    session_handlers,
    mcp_routes,
    audit_handlers,
    tx_handlers,
    history_handlers,
    storage_handlers,
    sync_service,
)  # importing them registers the routes


MAX_TIMEOUT = timedelta(days=3660)
# How long a shutdown waits for the write lock. A write holding it waits at most SQLite's busy
# timeout (5 s, vault_db) for another process holding the database, and then fails; 15 s covers
# that, the write itself and the metadata snapshot (~1 s at 100k entries), and stays far below
# a service manager's stop timeout (systemd's default 90 s) so the shutdown still locks the
# vault and exits 0 itself rather than being killed with the key in memory.
SHUTDOWN_WRITE_WAIT = 15.0
# After the lock: how long requests still in flight get to answer (those queued behind the
# write lock answer VAULT_LOCKED at once; one waiting for a person's answer is cut off)
SHUTDOWN_ANSWER_WAIT = 2.0


@dataclass(frozen=True)
class Config:
    lock: LockPolicy = field(default_factory=LockPolicy)
    max_ttl: timedelta = timedelta(days=90)
    request_max_minutes: int = 60
    webhook_url: str | None = None
    desktop_notifications: bool = True
    http: str | None = None
    http_limits: limits.HttpLimits = field(default_factory=limits.HttpLimits)
    mcp_tool_names: str = "apm"  # [mcp] tool_names: "apm" or "apono"
    approve_port: int = 0  # the approval page's own loopback port (0: any free one)
    teams_url: str | None = None
    email: EmailConfig | None = None


HTTP_LIMIT_KEYS = (
    "max_connections",
    "max_connections_per_uid",
    "max_sessions",
    "max_sessions_per_uid",
    "session_idle_minutes",
)


def _http_limits(section: dict[str, Any]) -> limits.HttpLimits:
    """[http] caps; unknown keys are refused (a typo must not silently leave a default)."""
    unknown = set(section) - {"listen", *HTTP_LIMIT_KEYS}
    if unknown:
        raise ValueError(f"unknown [http] key(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key in HTTP_LIMIT_KEYS:
        if key in section:
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"http.{key} must be a number")
            values[key] = float(value) if key == "session_idle_minutes" else value
    caps = limits.HttpLimits(**values)
    caps.check()
    return caps


def _mcp_tool_names(section: dict[str, Any]) -> str:
    """[mcp] tool_names = "apm" | "apono"; unknown keys and values are refused."""
    unknown = set(section) - {"tool_names"}
    if unknown:
        raise ValueError(f"unknown [mcp] key(s): {', '.join(sorted(unknown))}")
    value = section.get("tool_names", "apm")
    if value not in ("apm", "apono"):
        raise ValueError('mcp.tool_names must be "apm" or "apono"')
    return str(value)


def load_config(config_file: Path) -> Config:
    """config.toml: [lock] idle_minutes, max_hours; [sessions] max_ttl_days; [http] listen and
    caps (limits.HttpLimits)."""
    if not config_file.exists():
        return Config()
    try:
        doc = tomllib.loads(config_file.read_text())
        lock = doc.get("lock", {})
        idle = float(lock.get("idle_minutes", 30))
        hard = float(lock.get("max_hours", 12))
        max_ttl_days = float(doc.get("sessions", {}).get("max_ttl_days", 90))
        request_max = int(doc.get("requests", {}).get("max_minutes", 60))
        notify = doc.get("notify", {})
        webhook = notify.get("webhook_url")
        teams = notify.get("teams_webhook_url")
        if teams is not None and not (
            isinstance(teams, str) and teams.startswith(("https://", "http://"))
        ):
            raise ValueError("notify.teams_webhook_url must be an http(s) URL")
        email = EmailConfig.parse(notify["email"]) if "email" in notify else None
        desktop = bool(notify.get("desktop", True))
        http_section = doc.get("http", {})
        http = http_section.get("listen")
        if http is not None and not isinstance(http, str):
            raise ValueError("http.listen must be a string like 127.0.0.1:8765")
        http_limits = _http_limits(http_section)
        mcp_tool_names = _mcp_tool_names(doc.get("mcp", {}))
        approve_port = doc.get("approve", {}).get("port", 0)
        if isinstance(approve_port, bool) or not isinstance(approve_port, int):
            raise ValueError("approve.port must be a port number (0: any free port)")
        if not 0 <= approve_port < 65536:
            raise ValueError("approve.port must be 0..65535")
        if webhook is not None and not (
            isinstance(webhook, str) and webhook.startswith(("https://", "http://"))
        ):
            raise ValueError("notify.webhook_url must be an http(s) URL")
    except (tomllib.TOMLDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidParameters(
            f"cannot read {config_file}: {exc}", hint="fix or remove the config file"
        ) from exc
    # `0 < x <= cap` also refuses nan and inf; the cap keeps every deadline a valid datetime
    cap_days = MAX_TIMEOUT.days
    if not (
        0 < idle <= cap_days * 24 * 60
        and 0 < hard <= cap_days * 24
        and 0 < max_ttl_days <= cap_days
    ):
        raise InvalidParameters(
            f"{config_file}: timeouts must be positive and at most {cap_days} days"
        )
    return Config(
        lock=LockPolicy(idle=timedelta(minutes=idle), hard=timedelta(hours=hard)),
        max_ttl=timedelta(days=max_ttl_days),
        request_max_minutes=max(1, min(request_max, 7 * 24 * 60)),
        webhook_url=webhook,
        desktop_notifications=desktop,
        http=http,
        http_limits=http_limits,
        mcp_tool_names=mcp_tool_names,
        approve_port=approve_port,
        teams_url=teams,
        email=email,
    )


def setup_logging(log_path: Path, level: str, stderr: bool = True) -> None:
    ensure_private_dir(log_path.parent)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("apm")
    root.setLevel(level.upper())
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handlers: list[logging.Handler] = [logging.FileHandler(log_path)]
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


async def _reaper(state: State) -> None:
    """Sleep until the next auto-lock deadline, then lock (ssh-agent's reaper); also free the
    state of MCP connections whose shim died."""
    while True:
        left = state.cache.seconds_to_lock()
        await asyncio.sleep(1.0 if left is None else min(max(left, 0.05), 2.0))
        host = state._mcp_host.result() if state._mcp_host and state._mcp_host.done() else None
        if host is not None:
            await host.reap()
        state.rollback.integrity(state.audit)  # the audit log deleted or replaced: put it back
        left = state.cache.seconds_to_lock()
        if left is not None and left <= 0:
            async with state.write_lock:
                if await state.flush_and_lock():
                    log.info("vault auto-locked after its idle or maximum unlock time")
                    with contextlib.suppress(Exception):
                        state.record("vault.lock", reason="timeout")


async def _lock_for_shutdown(state: State) -> bool:
    """`flush_and_lock` under the write lock, as its rule says: a write in progress (its
    handler holds the write lock) lands completely first, and one queued behind it gets the
    lock after the vault is closed (VAULT_LOCKED, nothing written). Bounded by
    SHUTDOWN_WRITE_WAIT: a shutdown never hangs; past it the vault is locked without the
    write lock (the closed vault still refuses a later write) and a warning is logged."""
    try:
        await asyncio.wait_for(state.write_lock.acquire(), SHUTDOWN_WRITE_WAIT)
    except TimeoutError:
        log.warning(
            "a write held the write lock for %.0f s at shutdown; locking without it",
            SHUTDOWN_WRITE_WAIT,
        )
        return await state.flush_and_lock()
    try:
        return await state.flush_and_lock()
    finally:
        state.write_lock.release()


async def _serve(
    state: State, transport: Transport, pending: set[asyncio.Task[None]] | None = None
) -> None:
    """Receive until cancelled: MCP frames inline (one connection's frames stay in order),
    wire requests each in a task of its own (kept in `pending` until they answered)."""
    uid = os.getuid()
    pending = set() if pending is None else pending

    async def one(identity: bytes, raw: bytes, peer: Peer) -> None:
        transport.send(identity, await dispatch.handle(state, raw, peer, identity))

    loaded: list[Any] = []  # the McpHost once its import finished (the hot path's one lookup)

    def mcp_frame(identity: bytes, frames: list[bytes], peer: Peer) -> None:
        if loaded:
            loaded[0].on_frame(identity, frames[1], frames[2], peer)
            return
        host_future = state._mcp_host
        if host_future is None:
            return
        if not host_future.done():  # still importing: deliver in order once it is there
            host_future.add_done_callback(lambda _: mcp_frame(identity, frames, peer))
            return
        host = None if host_future.cancelled() or host_future.exception() else host_future.result()
        if host is not None:
            if host_future is state._mcp_host:
                loaded.append(host)
            host.on_frame(identity, frames[1], frames[2], peer)

    def on_message(identity: bytes, frames: list[bytes], peer: Peer | None) -> None:
        if peer is None or peer.uid != uid:
            log.warning(
                "dropped message from peer uid=%s pid=%s (not our uid %s)",
                getattr(peer, "uid", "?"),
                getattr(peer, "pid", "?"),
                uid,
            )
            return
        if len(frames) == 3 and frames[0] == MCP_FRAME:
            mcp_frame(identity, frames, peer)
            return
        if len(frames) != 1:
            log.warning("dropped message with %d frames from pid=%s", len(frames), peer.pid)
            return
        task = asyncio.create_task(one(identity, frames[0], peer))
        pending.add(task)
        task.add_done_callback(pending.discard)

    transport.start(on_message)
    try:
        await asyncio.Event().wait()
    finally:
        transport.stop()


def _on_loop(
    loop: asyncio.AbstractEventLoop, transport: Transport | None = None
) -> Callable[[Callable[[], None]], object]:
    """Schedule a callback on `loop` from any thread (records may be written from the I/O
    pool): at the end of the transport's batch being received, if there is one (no event-loop
    turn of its own), else call_soon on the loop's own thread, call_soon_threadsafe from any
    other."""
    loop_thread = threading.get_ident()

    def defer(callback: Callable[[], None]) -> object:
        if threading.get_ident() == loop_thread:
            if transport is not None and transport.after_batch(callback):
                return None
            return loop.call_soon(callback)
        return loop.call_soon_threadsafe(callback)

    return defer


async def _load_mcp_host(state: State, transport: Transport) -> Any:
    """Import the MCP host (and the mcp SDK, ~0.5 s) off the event loop, once, at start."""
    try:
        module = await asyncio.to_thread(importlib.import_module, "broker.server.mcp_host")
    except Exception:
        log.error("MCP support failed to load; MCP clients cannot attach", exc_info=True)
        return None
    return module.McpHost(state, transport)


@dataclass(frozen=True)
class HttpOptions:
    listen: str
    allow_remote: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    limits: limits.HttpLimits = field(default_factory=limits.HttpLimits)


def _check_http(opts: HttpOptions) -> tuple[Any, tuple[str, str] | None]:
    """Validate --http before anything is bound, so a refusal leaves nothing behind."""
    from .http import Listen

    listen = Listen.parse(opts.listen, opts.allow_remote)
    tls = None
    if opts.allow_remote:
        if not (opts.tls_cert and opts.tls_key):
            raise InvalidParameters("--allow-remote needs --tls-cert and --tls-key")
        tls = (opts.tls_cert, opts.tls_key)
    return listen, tls


def _vault_secret(state: State, ref: str) -> str | None:
    """The main secret of the entry `ref` ("space/name" or "name"), for the broker's own use
    (the SMTP password); None while locked or when there is no such entry."""
    vault = state.cache.peek()
    if vault is None:
        return None
    space, _, name = ref.rpartition("/")
    try:
        entry = vault.resolve(name, space or None)
        return vault.reveal(entry, None)[1]
    except ApmError:
        return None


async def _start_http(state: State, opts: HttpOptions) -> Any:
    from .http import HttpFrontend

    listen, tls = _check_http(opts)
    frontend = HttpFrontend(state, listen, tls, opts.limits)
    await frontend.start()
    return frontend


async def run(p: paths.Paths, config: Config, http: HttpOptions | None = None) -> int:
    # searches run in worker threads: the event loop gets the GIL back within 0.5 ms instead
    # of the default 5 ms, so a ping never waits behind a search for long
    sys.setswitchinterval(0.0005)
    transport = Transport(p.broker_addr, _lock_path(p))
    transport.bind()
    state = State(
        paths=p,
        cache=OpenVault(config.lock),
        max_ttl=config.max_ttl,
        notifier=Notifier(
            config.webhook_url,
            config.desktop_notifications,
            teams_url=config.teams_url,
            email=config.email,
        ),
        request_max_minutes=config.request_max_minutes,
        mcp_tool_names=config.mcp_tool_names,
    )
    if state.notifier is not None:
        state.notifier.password = functools.partial(_vault_secret, state)
    state._mcp_host = asyncio.ensure_future(_load_mcp_host(state, transport))
    # the checkpoint is rewritten once per burst of records (after the batch of messages
    # received, or after the event-loop turn)
    state.audit = AuditLog(
        p.state_dir / "audit.jsonl", defer=_on_loop(asyncio.get_running_loop(), transport)
    )
    try:
        state.audit.open()
        state.record("broker.start", version=__version__, pid=os.getpid())
        frontend = await _start_http(state, http) if http is not None else None
        page = None
        if frontend is None or not frontend.serves_page:
            from .page_server import PageServer

            page = PageServer(state, config.approve_port)
            await page.start()
    except BaseException:  # nothing left behind: no socket, no lock, no half-open log
        with contextlib.suppress(Exception):
            state.record("broker.stop", reason="start failed")
        state.audit.close()
        transport.close()
        state._mcp_host.cancel()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, state.shutdown.set)
    log.info("apm-broker %s listening on %s (pid %d)", __version__, p.broker_addr, os.getpid())
    sd_notify.notify(f"READY=1\nSTATUS=listening on {p.broker_addr}\nMAINPID={os.getpid()}")
    in_flight: set[asyncio.Task[None]] = set()  # wire requests not answered yet
    serve = asyncio.create_task(_serve(state, transport, in_flight))
    reaper = asyncio.create_task(_reaper(state))
    try:
        await state.shutdown.wait()
    finally:
        serve.cancel()
        reaper.cancel()
        sd_notify.notify("STOPPING=1")
        if frontend is not None:
            await frontend.stop()
        if page is not None:
            await page.stop()
        host = state._mcp_host.result() if state._mcp_host.done() else None
        if host is not None:
            await host.close_all()
        log.info("stopping: locking the vault once the write in progress (if any) ends")
        was = await _lock_for_shutdown(state)
        if in_flight:  # queued behind the write lock: they answer VAULT_LOCKED now
            await asyncio.wait(set(in_flight), timeout=SHUTDOWN_ANSWER_WAIT)
        with contextlib.suppress(Exception):
            state.record("broker.stop", was_unlocked=was)
        state.audit.close()
        transport.close()
        state.kdf_pool.shutdown(wait=False, cancel_futures=True)
        state.io_pool.shutdown(wait=True)
        log.info("broker stopped; vault locked")
    return 0


def _lock_path(p: paths.Paths) -> Path:
    sock = p.socket_path
    return (
        sock.with_name(sock.name + ".lock") if sock is not None else p.runtime_dir / "broker.lock"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apm-broker",
        description="The apm broker: holds the vault key in memory and serves the apm CLI "
        "and MCP shims over a local socket. Usually started with `apm broker start`.",
    )
    parser.add_argument("--log-level", default=os.environ.get("APM_LOG_LEVEL", "info"))
    parser.add_argument(
        "--no-stderr-log", action="store_true", help="log only to the log file (detached mode)"
    )
    parser.add_argument("--http", metavar="HOST:PORT", help="also serve MCP over HTTP at /mcp")
    parser.add_argument("--allow-remote", action="store_true")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--version", action="version", version=f"apm-broker {__version__}")
    args = parser.parse_args(argv)
    hardening.apply()
    nofile = limits.raise_nofile()  # before zmq opens anything: see limits.py
    p = paths.resolve()
    try:
        setup_logging(p.log_path, args.log_level, stderr=not args.no_stderr_log)
        log.debug("open-file limit %d", nofile)
        config = load_config(p.config_file)
        listen = args.http or config.http
        http = (
            HttpOptions(listen, args.allow_remote, args.tls_cert, args.tls_key, config.http_limits)
            if listen
            else None
        )
        if http is not None:
            _check_http(http)
        return asyncio.run(run(p, config, http))
    except ApmError as exc:
        sys.stderr.write(f"apm-broker: error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"apm-broker: hint: {exc.hint}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
