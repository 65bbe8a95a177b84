"""The relay's two ways of answering a `tools/call` agree: the fast path (stdlib json, no SDK
machinery) and the SDK's low-level Server give the same answer for the same request.

Table-driven, in-process: a real MCP host over a real State (vault file, audit log), a
transport that only records frames. Each request runs twice on a connection of the named
scope — once with the fast path on, once with it off — and the two responses must be equal.
Cases: odd ids, both protocol eras, `_meta`, unknown protocol versions, every scope and the
error classes a tool call can meet (not found, ambiguous, permission, invalid parameters,
locked vault, ended session).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import broker.server.daemon  # noqa: F401 - declares every operation the real broker serves
from broker.core.sessions import CreateSpec
from broker.core.vault import Change, Vault
from broker.server.context import Context
from broker.server.mcp_host import MODERN_VERSION, PROTOCOL_VERSION_META, McpHost
from broker.server.peer import Peer
from broker.server.state import State
from broker.wire.protocol import McpAttachParams

from .twin import broker_state

PASSWORD = "correct horse battery staple"
SCOPES = ("read", "secrets", "write", "admin")


class Frames:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, ...]] = []

    def send_frames(self, identity: bytes, *frames: bytes) -> None:
        self.sent.append((identity, *frames))


def _seed(v: Vault) -> None:
    v.space_add("work")
    v.add(
        "login",
        "seed",
        "default",
        ["prod"],
        "https://e.example",
        None,
        Change({}, {"password": "pw-1"}, []),
    )
    v.add("login", "twice", "default", [], None, None, Change({}, {"password": "pw-2"}, []))
    v.add("login", "twice", "work", [], None, None, Change({}, {"password": "pw-3"}, []))
    v.add(
        "totp",
        "otp",
        "default",
        [],
        None,
        None,
        Change({}, {"secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"}, []),
    )


class Paths2:
    """One MCP host, and a connection per scope, driven frame by frame."""

    def __init__(self, state: State, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.frames = Frames()
        self.host = McpHost(state, self.frames)  # type: ignore[arg-type]
        self.peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
        self.conns: dict[str, str] = {}
        self.fast = True
        original = self.host._fast_call
        self.host._fast_call = lambda c, p: self.fast and original(c, p)  # type: ignore[method-assign]

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    def connect(self, scope: str) -> str:
        """A connection with a session of `scope` ("read-modern": no handshake, 2026 era)."""
        modern = scope.endswith("-modern")
        _, rec = self.state.sessions().create(
            CreateSpec(
                label=f"p-{scope}",
                scope=scope.split("-")[0],  # type: ignore[arg-type]
                ttl=timedelta(hours=1),
                tool_names="apono" if "apono" in scope else None,  # "read-apono": #14.5 names
            )
        )
        ctx = Context(state=self.state, peer=self.peer, auth=None, request_id="", session=rec)
        identity = scope.encode()
        res = self.run(self.host.attach(ctx, identity, McpAttachParams(client_name="paths")))
        conn = res.conn
        self.conns[scope] = conn
        if modern:
            return conn
        self.send(
            identity,
            conn,
            {
                "jsonrpc": "2.0",
                "id": "init",
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "paths", "version": "1"},
                },
            },
        )
        self.send(
            identity, conn, {"jsonrpc": "2.0", "method": "notifications/initialized"}, wait=False
        )
        self.conns[scope] = conn
        return conn

    def send(self, identity: bytes, conn: str, doc: Any, wait: bool = True) -> Any:
        before = len(self.frames.sent)
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

        async def deliver() -> None:  # as the transport does: from inside the running loop
            self.host.on_frame(identity, conn.encode(), raw, self.peer)

        self.run(deliver())

        async def answer() -> Any:
            while True:
                for frame in self.frames.sent[before:]:
                    if frame[1] == b"mcp":
                        return json.loads(frame[3])
                await asyncio.sleep(0.001)

        if not wait:
            self.run(asyncio.sleep(0.01))
            return None
        return self.run(answer())

    def call(self, scope: str, doc: Any) -> tuple[Any, Any]:
        conn = self.conns.get(scope) or self.connect(scope)
        self.fast = True
        fast = self.send(scope.encode(), conn, doc)
        self.fast = False
        sdk = self.send(scope.encode(), conn, doc)
        self.fast = True
        return fast, sdk


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths2]:
    root: Path = tmp_path_factory.mktemp("paths")
    with broker_state(root, PASSWORD, seed=_seed) as state:
        loop = asyncio.new_event_loop()
        p = Paths2(state, loop)
        try:
            yield p
        finally:
            loop.run_until_complete(p.host.close_all())
            loop.close()


def call(
    rid: Any, name: str, args: Any = None, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if args is not None:
        params["arguments"] = args
    if meta is not None:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


MODERN = {
    PROTOCOL_VERSION_META: MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "m", "version": "1"},
}
CASES: list[tuple[str, str, dict[str, Any]]] = [
    # odd ids
    ("read", "id-zero", call(0, "list_entries")),
    ("read", "id-negative", call(-7, "list_entries")),
    ("read", "id-big", call(2**53, "list_entries")),
    ("read", "id-empty-string", call("", "list_entries")),
    ("read", "id-unicode", call("ид-☃", "list_entries")),
    ("read", "id-float", call(1.5, "list_entries")),
    # _meta and protocol eras
    ("read", "meta-progress", call(1, "list_entries", {}, {"progressToken": "p1"})),
    ("read-modern", "modern-era", call(2, "search_entries", {"query": "seed"}, MODERN)),
    ("read", "modern-request-on-a-legacy-connection", call(2, "list_entries", {}, MODERN)),
    ("read-modern", "legacy-request-on-a-modern-connection", call(2, "list_entries", {})),
    ("read-modern", "modern-not-found", call(2, "get_entry", {"entry": "nope"}, MODERN)),
    (
        "read-modern",
        "modern-without-capabilities",
        call(2, "list_entries", {}, {PROTOCOL_VERSION_META: MODERN_VERSION}),
    ),
    ("read", "unknown-version", call(3, "list_entries", {}, {PROTOCOL_VERSION_META: "2099-01-01"})),
    (
        "read",
        "arguments-null",
        {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "assist", "arguments": None},
        },
    ),
    # results and errors
    ("read", "get-entry", call(5, "get_entry", {"entry": "seed"})),
    ("read", "not-found", call(6, "get_entry", {"entry": "nope"})),
    ("read", "ambiguous", call(7, "get_entry", {"entry": "twice"})),
    ("read", "unknown-argument", call(8, "list_entries", {"bogus": 1})),
    ("read", "bad-type", call(9, "list_entries", {"limit": "many"})),
    ("read", "arguments-not-object", call(10, "list_entries", [1, 2])),
    ("read", "request-status-unknown", call(11, "get_request_status", {"request_id": "req_x"})),
    ("read", "status-tool", call(12, "apm_status")),
    # #14.5 seed-compatible names: one set per session, the other set's names unknown
    ("read-apono", "apono-assist", call(40, "user_apono_assist", {"question": "seed twice"})),
    ("read-apono", "apono-apm-name-unknown", call(41, "assist")),
    ("read-apono", "apono-status", call(42, "user_get_request_status", {"request_id": "req_x"})),
    (
        "read-apono",
        "apono-create-invalid",
        call(43, "user_create_request", {"entry": "seed", "duration_minutes": 1}),
    ),
    ("read-apono", "apono-details-unknown", call(44, "get_access_details", {"request_id": "x"})),
    ("read", "apm-apono-name-unknown", call(45, "user_apono_assist", {})),
    # ping: answered by the fast path on an initialized legacy connection, else by the SDK
    ("read", "ping", {"jsonrpc": "2.0", "id": 60, "method": "ping"}),
    ("read", "ping-string-id", {"jsonrpc": "2.0", "id": "p\u2603", "method": "ping"}),
    ("read", "ping-params", {"jsonrpc": "2.0", "id": 61, "method": "ping", "params": {}}),
    (
        "read",
        "ping-progress",
        {"jsonrpc": "2.0", "id": 62, "method": "ping", "params": {"_meta": {"progressToken": 1}}},
    ),
    ("read", "ping-id-float", {"jsonrpc": "2.0", "id": 63.5, "method": "ping"}),
    ("read", "ping-params-list", {"jsonrpc": "2.0", "id": 64, "method": "ping", "params": [1]}),
    (
        "read",
        "ping-modern-meta",
        {"jsonrpc": "2.0", "id": 65, "method": "ping", "params": {"_meta": MODERN}},
    ),
    (
        "read-modern",
        "ping-modern",
        {"jsonrpc": "2.0", "id": 66, "method": "ping", "params": {"_meta": MODERN}},
    ),
    ("read-modern", "ping-on-a-modern-connection", {"jsonrpc": "2.0", "id": 67, "method": "ping"}),
    ("read", "ping-extra-member", {"jsonrpc": "2.0", "id": 68, "method": "ping", "x": 1}),
    (
        "read",
        "not-ping",
        {"jsonrpc": "2.0", "id": 69, "method": "tools/list", "params": {"x": "ping"}},
    ),
]
for _scope in SCOPES:
    CASES += [
        (_scope, f"{_scope}-decrypt", call(20, "decrypt_entry", {"entry": "seed"})),
        (
            _scope,
            f"{_scope}-secret-in-get",
            call(21, "get_entry", {"entry": "seed", "include_secret": True}),
        ),
        (_scope, f"{_scope}-audit", call(22, "get_audit_logs", {"limit": 1, "event": "none-such"})),
        (_scope, f"{_scope}-profiles", call(23, "manage_profiles", {})),
        (_scope, f"{_scope}-history", call(24, "get_history", {"entry": "nope"})),
    ]


def _normal(doc: Any) -> Any:
    """Remove what legitimately differs between two runs of one call (a TOTP code's clock)."""
    return doc


@pytest.mark.parametrize(("scope", "case", "doc"), CASES, ids=[c[1] for c in CASES])
def test_the_fast_path_and_the_sdk_path_give_the_same_answer(
    paths: Paths2, scope: str, case: str, doc: dict[str, Any]
) -> None:
    fast, sdk = paths.call(scope, doc)
    assert _normal(fast) == _normal(sdk)


@pytest.mark.parametrize(
    ("scope", "name", "known"),
    [
        ("read-apono", "user_apono_assist", True),
        ("read-apono", "assist", False),
        ("read", "assist", True),
        ("read", "user_apono_assist", False),
    ],
)
def test_both_paths_serve_only_the_active_naming(
    paths: Paths2, scope: str, name: str, known: bool
) -> None:
    fast, sdk = paths.call(scope, call(50, name, {"question": "seed"}))
    assert fast == sdk
    result = fast["result"]
    if known:
        assert not result["isError"]
        hits = result["structuredContent"]["candidates"]
        assert hits and hits[0]["entry"]["name"] in ("seed", "twice")
    else:
        assert result["_meta"]["apm/error"]["code"] == "INVALID_PARAMETERS"
        assert "unknown tool" in result["_meta"]["apm/error"]["message"]


@pytest.mark.parametrize("scope", SCOPES)
def test_both_paths_agree_on_a_locked_vault_and_on_an_ended_session(
    paths: Paths2, scope: str
) -> None:
    conn = paths.conns.get(scope) or paths.connect(scope)
    accessor = paths.host.conns[conn].accessor
    doc = call(30, "list_entries")
    vault = paths.state.cache.peek()
    paths.state.cache.lock()
    try:
        fast, sdk = paths.call(scope, doc)
        assert fast == sdk and fast["result"]["_meta"]["apm/error"]["code"] == "VAULT_LOCKED"
    finally:
        assert vault is not None
        paths.state.cache.put(vault)
    paths.state.sessions().revoke(accessor)
    fast, sdk = paths.call(scope, doc)
    assert fast == sdk and fast["result"]["_meta"]["apm/error"]["code"] == "SESSION_REQUIRED"
    paths.conns.pop(scope)


def test_a_legacy_ping_is_answered_by_the_fast_path_and_a_modern_one_by_the_sdk(
    paths: Paths2,
) -> None:
    """The equality above holds either way a ping is answered; this pins which way: an
    initialized legacy connection's ping never reaches the SDK server, a modern one does."""
    for scope, doc, fast in (
        ("read", {"jsonrpc": "2.0", "id": 70, "method": "ping"}, True),
        ("read", {"jsonrpc": "2.0", "id": "s", "method": "ping", "params": {}}, True),
        (
            "read-modern",
            {"jsonrpc": "2.0", "id": 71, "method": "ping", "params": {"_meta": MODERN}},
            False,
        ),
        ("read", {"jsonrpc": "2.0", "id": True, "method": "ping"}, False),
    ):
        conn_id = paths.conns.get(scope) or paths.connect(scope)
        conn = paths.host.conns[conn_id]
        before = len(paths.frames.sent)
        assert paths.host._fast_call(conn, json.dumps(doc).encode()) is fast
        if fast:
            (frame,) = paths.frames.sent[before:]
            assert json.loads(frame[3]) == {"jsonrpc": "2.0", "id": doc["id"], "result": {}}
        else:
            assert paths.frames.sent[before:] == []
