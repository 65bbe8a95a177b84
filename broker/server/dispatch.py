"""Turns one request frame into one response frame: envelope, version, lock gate, auth, handler.

Rules:
- `handle` never raises and never puts a traceback on the wire: `to_wire_error` is the one
  function that maps exceptions to wire errors; unexpected ones are logged here with their
  traceback and leave as INTERNAL_ERROR.
- Validation errors name field paths only, never the input (it may be a secret).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from broker import __version__
from broker.core.crypto import normalize_password, zero
from broker.core.key_cache import KeyCache
from broker.core.vault import Vault
from broker.paths import Paths
from broker.wire.errors import (
    ApmError,
    BadPassword,
    InternalError,
    InvalidParameters,
    RequestTooLarge,
    SessionRequired,
    UnsupportedVersion,
)
from broker.wire.protocol import (
    MAX_FRAME_BYTES,
    METHODS,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Auth,
    ErrorBody,
    Request,
    Response,
    encode_result,
)

from .transport import Peer

log = logging.getLogger("apm.broker")
T = TypeVar("T")


@dataclass(frozen=True)
class Access:
    """What a method needs before its handler runs."""

    unlocked: bool = False  # the lock gate: refuse with VAULT_LOCKED first
    owner: bool = False  # the master password, verified now


@dataclass
class State:
    paths: Paths
    cache: KeyCache
    started_at: float = field(default_factory=time.time)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    kdf_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kdf")
    )
    io_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="io")
    )

    async def kdf(self, fn: Callable[..., T], *args: Any) -> T:
        """Key derivations run one at a time, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.kdf_pool, fn, *args)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Durable writes run one at a time, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)


@dataclass
class Context:
    state: State
    peer: Peer
    auth: Auth | None
    request_id: str

    def password(self) -> bytearray:
        if self.auth is None or self.auth.password is None:
            raise SessionRequired(
                "the master password is required", hint="run the command from a terminal"
            )
        return normalize_password(self.auth.password.get_secret_value())

    async def vault(self) -> Vault:
        return self.state.cache.get()


Handler = Callable[[Context, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Route:
    handler: Handler
    params: type[BaseModel]
    access: Access


ROUTES: dict[str, Route] = {}


def route(method: str, access: Access = Access()) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        ROUTES[method] = Route(fn, METHODS[method][0], access)
        return fn

    return register


def to_wire_error(exc: BaseException) -> ErrorBody:
    """The one function that maps an exception to the wire."""
    if isinstance(exc, ApmError):
        return ErrorBody(code=exc.code, message=exc.message, hint=exc.hint, data=exc.data)
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(root)" for e in exc.errors()})
        return ErrorBody(
            code=InvalidParameters.code,
            message="invalid parameters: " + ", ".join(fields),
            hint="check the named fields",
            data={
                "fields": fields,
                "errors": [{"loc": e["loc"], "type": e["type"]} for e in exc.errors()],
            },
        )
    log.error("unexpected error", exc_info=exc)
    err = InternalError()
    return ErrorBody(code=err.code, message=err.message, hint=err.hint)


def _envelope(raw: bytes) -> tuple[str, Request]:
    if len(raw) > MAX_FRAME_BYTES:
        raise RequestTooLarge(data={"limit": MAX_FRAME_BYTES})
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParameters("request is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise InvalidParameters("request must be a JSON object")
    rid = doc.get("id") if isinstance(doc.get("id"), str) else ""
    v = doc.get("v")
    if not isinstance(v, int) or not MIN_PROTOCOL_VERSION <= v <= PROTOCOL_VERSION:
        raw_client = doc.get("client")
        client = raw_client if isinstance(raw_client, str) else "unknown client"
        raise UnsupportedVersion(
            f"{client[:64]} speaks protocol {v!r}; broker {__version__} speaks "
            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
            data={
                "client_protocol": v if isinstance(v, int) else None,
                "broker_version": __version__,
                "min_protocol": MIN_PROTOCOL_VERSION,
                "max_protocol": PROTOCOL_VERSION,
            },
        )
    return str(rid)[:64], Request.model_validate(doc)


_READS = frozenset({"broker.ping", "broker.status", "entry.list", "entry.search", "entry.show"})


async def handle(state: State, raw: bytes, peer: Peer) -> bytes:
    started = time.perf_counter()
    rid, method = "", "?"
    try:
        rid, req = _envelope(raw)
        method = req.method
        route_ = ROUTES.get(req.method)
        if route_ is None:
            raise InvalidParameters(
                "unknown method", data={"method": req.method[:64]}, hint="upgrade apm?"
            )
        params = route_.params.model_validate(req.params)
        ctx = Context(state=state, peer=peer, auth=req.auth, request_id=rid)
        if route_.access.unlocked:
            state.cache.get()  # lock gate: VAULT_LOCKED before anything costly
        if route_.access.owner:
            await _verify_owner(ctx)
        result = await route_.handler(ctx, params)
        resp = Response(id=rid, ok=True, result=encode_result(result))
        code = "OK"
    except Exception as exc:
        body = to_wire_error(exc)
        resp = Response(id=rid, ok=False, error=body)
        code = body.code
    ms = (time.perf_counter() - started) * 1000
    level = logging.DEBUG if method in _READS and code == "OK" else logging.INFO
    log.log(level, "%s pid=%s -> %s (%.1f ms)", method[:64], peer.pid, code, ms)
    return resp.encode()


async def _verify_owner(ctx: Context) -> None:
    password = ctx.password()
    vault = ctx.state.cache.get()
    try:
        await ctx.state.kdf(vault.check_password, password)
    except BadPassword:
        log.warning("owner check failed: wrong master password (pid=%s)", ctx.peer.pid)
        raise
    finally:
        zero(password)
