"""The `apm-mcp` shim as a raw process: what it does with bad input, how it ends, what it loads,
and what its debug log keeps.

The shim is driven through its pipes, one line at a time, both attached to a real broker and
with no broker at all; whatever else happens, every line it writes to stdout must be a
JSON-RPC object.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import shim.main
from broker.wire import protocol, relay

from .conftest import PY, Apm, Broker, clean_env, make_home
from .mcp_client import error_body
from .test_mcp_e2e import start_broker

pytestmark = pytest.mark.slow

SHIM = Path(sys.executable).parent / "apm-mcp"
SECRET = "shim-Secret-2291-unique"
FORBIDDEN = ("mcp", "mcp_types", "pydantic", "pydantic_core", "cryptography", "psutil", "argon2")
EXIT_WITHIN = 5.0
FAKE_TOKEN = "eps_" + "x" * 43


def initialize(rid: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw-test", "version": "0"},
        },
    }


INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def request(rid: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def is_jsonrpc(doc: object) -> bool:
    """A JSON-RPC 2.0 response or a notification/request, nothing else."""
    if not isinstance(doc, dict) or doc.get("jsonrpc") != "2.0":
        return False
    if "method" in doc:
        return isinstance(doc["method"], str)
    if "id" not in doc:
        return False
    if "error" in doc:
        err = doc["error"]
        return (
            "result" not in doc
            and isinstance(err, dict)
            and isinstance(err.get("code"), int)
            and isinstance(err.get("message"), str)
        )
    return "result" in doc


@dataclass
class RawShim:
    """`apm-mcp` with pipes on stdin and stdout; stderr goes to a file."""

    home: Path
    env: dict[str, str]
    args: tuple[str, ...] = ()
    argv: tuple[str, ...] = (str(SHIM),)
    raw: list[bytes] = field(default_factory=list)  # every stdout line, as written
    _buf: bytes = b""

    def __post_init__(self) -> None:
        self.stderr_path = self.home / f"shim-stderr-{time.monotonic_ns()}.log"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*self.argv, *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
            )

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, msg: object) -> None:
        self.write(json.dumps(msg).encode() + b"\n")

    def _fill(self, timeout: float) -> bool:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def line(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next stdout line, parsed; fails if none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0 and self._fill(left), f"no line from the shim within {timeout} s"
        raw, self._buf = self._buf.split(b"\n", 1)
        self.raw.append(raw)
        doc = json.loads(raw)
        assert isinstance(doc, dict), raw[:200]
        return doc

    def call(self, msg: object, timeout: float = 10.0) -> dict[str, Any]:
        """Send a line and return the next non-notification line."""
        self.send(msg)
        while True:
            doc = self.line(timeout)
            if "method" not in doc or "id" in doc:
                return doc

    def close(self, timeout: float = EXIT_WITHIN) -> int:
        """Close stdin, wait for the exit, read whatever stdout still held."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"the shim did not exit within {timeout} s of stdin closing"
            ) from exc
        rest = self._buf + self.proc.stdout.read()
        self._buf = b""
        self.raw.extend(line for line in rest.split(b"\n") if line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@dataclass
class Place:
    """Where a shim runs: a home, a token, and whether a broker is there."""

    home: Path
    token: str
    attached: bool

    def shim(self, *args: str, **env: str) -> RawShim:
        return RawShim(self.home, clean_env(self.home, APM_EPHEMERAL_ID=self.token, **env), args)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Path, Apm, Broker]]:
    home = make_home()
    broker = Broker(home)
    start_broker(broker)
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        apm.ok("add", "api_key", "deploy", "--from-stdin", stdin=SECRET + "\n")
        yield home, apm, broker
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def read_token(served: tuple[Path, Apm, Broker]) -> str:
    _, apm, _ = served
    out = apm.ok("delegate", "--scope", "read", "--ttl", "1h", "--json").stdout
    return str(json.loads(out)["token"])


@pytest.fixture(params=["attached", "no-broker"])
def place(
    request: pytest.FixtureRequest, served: tuple[Path, Apm, Broker], read_token: str
) -> Iterator[Place]:
    if request.param == "attached":
        yield Place(served[0], read_token, attached=True)
        return
    home = make_home()
    try:
        yield Place(home, FAKE_TOKEN, attached=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def running(place: Place) -> Iterator[RawShim]:
    proc = place.shim()
    try:
        yield proc
    finally:
        proc.kill()


def handshake(proc: RawShim) -> dict[str, Any]:
    reply = proc.call(initialize())
    assert reply.get("id") == 1 and "result" in reply, reply
    proc.send(INITIALIZED)
    return dict(reply["result"])


def assert_only_protocol(proc: RawShim) -> None:
    assert proc.raw, "the shim wrote nothing"
    for raw in proc.raw:
        doc = json.loads(raw)  # every line parses ...
        assert is_jsonrpc(doc), raw[:200]  # ... and is a JSON-RPC object


# ---------------------------------------------------------------------- bad input


def test_a_line_that_is_not_json_gets_a_parse_error_and_the_session_goes_on(
    running: RawShim,
) -> None:
    running.write(b"this is not json\n")  # before initialize: the first thing a client sends
    first = running.line()
    handshake(running)
    running.write(b"{still not json\n")
    second = running.line()
    running.write(b"\xff\xfe\x00 binary \x80\n")
    third = running.line()
    listed = running.call(request(2, "tools/list"))
    assert running.close() == 0
    for err in (first, second, third):
        assert err["id"] is None
        assert err["error"]["code"] == -32700
    assert listed["id"] == 2 and listed["result"]["tools"]
    assert_only_protocol(running)


@pytest.mark.parametrize(
    "line",
    [
        b'[{"jsonrpc":"2.0","id":9,"method":"ping"}]',
        b"[]",
        b"42",
        b'"tools/list"',
        b"null",
    ],
    ids=["batch-array", "empty-array", "number", "string", "null"],
)
def test_json_that_is_not_one_object_gets_invalid_request(running: RawShim, line: bytes) -> None:
    handshake(running)
    running.write(line + b"\n")
    err = running.line()
    pong = running.call(request(2, "ping"))
    assert running.close() == 0
    assert err["id"] is None
    assert err["error"]["code"] == -32600
    assert pong == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert_only_protocol(running)


def test_an_oversize_line_is_refused_and_the_next_line_is_served(running: RawShim) -> None:
    handshake(running)
    big = b'{"jsonrpc":"2.0","id":5,"method":"ping","params":{"pad":"'
    big += b"a" * shim.main.MAX_LINE + b'"}}\n'
    running.write(big)
    refused = running.line()
    # an oversize line arriving in pieces, without a newline for a long while
    running.write(b"b" * (shim.main.MAX_LINE // 2))
    running.write(b"b" * (shim.main.MAX_LINE // 2 + 10))
    running.write(b"b" * 1000 + b"\n")
    refused_again = running.line()
    pong = running.call(request(6, "ping"))
    assert running.close() == 0
    for err in (refused, refused_again):
        assert err["id"] is None
        assert err["error"]["code"] == -32600
    assert pong == {"jsonrpc": "2.0", "id": 6, "result": {}}
    assert_only_protocol(running)
    assert all(len(raw) < 4096 for raw in running.raw)  # the input is never echoed


@pytest.mark.parametrize(
    ("line", "rid"),
    [
        (b'{"foo":1}', None),
        (b'{"jsonrpc":"2.0","id":7,"method":123}', 7),
        (b'{"jsonrpc":"2.0","id":"q"}', "q"),
    ],
    ids=["no-method", "method-not-a-string", "neither-request-nor-response"],
)
def test_an_object_without_a_usable_method_gets_invalid_request(
    running: RawShim, line: bytes, rid: object
) -> None:
    handshake(running)
    running.write(line + b"\n")
    err = running.line()
    pong = running.call(request(2, "ping"))
    assert running.close() == 0
    assert err["id"] == rid
    assert err["error"]["code"] == -32600
    assert pong == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert_only_protocol(running)


def test_an_unknown_method_gets_method_not_found_with_its_id(running: RawShim) -> None:
    handshake(running)
    unknown = running.call(request(7, "vault/steal"))
    named = running.call(request("abc", "resources/subscribe_everything", {}))
    listed = running.call(request(8, "tools/list"))
    assert running.close() == 0
    assert unknown["id"] == 7 and unknown["error"]["code"] == -32601
    assert named["id"] == "abc" and named["error"]["code"] == -32601
    assert listed["id"] == 8 and "result" in listed
    assert_only_protocol(running)


def test_tools_list_answers_with_the_real_tools_or_with_apm_status(
    running: RawShim, place: Place
) -> None:
    handshake(running)
    listed = running.call(request(2, "tools/list"))
    assert running.close() == 0
    names = {t["name"] for t in listed["result"]["tools"]}
    if place.attached:
        assert {"list_entries", "search_entries", "get_entry", "assist"} <= names
        assert "apm_status" not in names
    else:
        assert names == {"apm_status"}


# ---------------------------------------------------------------------- lifetime


def test_the_shim_exits_with_code_0_when_stdin_closes(running: RawShim) -> None:
    handshake(running)
    assert running.call(request(2, "ping"))["result"] == {}
    started = time.monotonic()
    assert running.close() == 0
    assert time.monotonic() - started < EXIT_WITHIN
    assert_only_protocol(running)


def test_a_shim_whose_stdin_closes_at_once_exits_0_and_writes_nothing(place: Place) -> None:
    proc = place.shim()
    try:
        assert proc.close() == 0
        assert proc.raw == []  # no banner on stdout, ever
    finally:
        proc.kill()


def test_a_shim_without_a_token_still_answers_and_says_how_to_get_one(
    served: tuple[Path, Apm, Broker],
) -> None:
    home = served[0]
    proc = RawShim(home, clean_env(home))
    try:
        handshake(proc)
        listed = proc.call(request(2, "tools/list"))
        called = proc.call(request(3, "tools/call", {"name": "list_entries", "arguments": {}}))
        assert proc.close() == 0
    finally:
        proc.kill()
    assert [t["name"] for t in listed["result"]["tools"]] == ["apm_status"]
    body = error_body(called["result"])  # no structuredContent: not list_entries' schema
    assert body["code"] == "SESSION_REQUIRED"
    assert "apm mcp install" in body["hint"] or "apm delegate" in body["hint"]
    assert_only_protocol(proc)


# ---------------------------------------------------------------------- what it is made of

IMPORT_PROBE = r"""
import json, os, sys
import shim.main
code = shim.main.main([])
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def test_the_shim_process_loads_neither_mcp_pydantic_cryptography_nor_psutil(
    place: Place,
) -> None:
    out = place.home / f"probe-{time.monotonic_ns()}.json"
    env = clean_env(place.home, APM_EPHEMERAL_ID=place.token, PROBE_OUT=str(out))
    proc = RawShim(place.home, env, argv=(PY, "-c", IMPORT_PROBE))
    try:
        handshake(proc)  # a whole session runs, so lazily imported modules count too
        listed = proc.call(request(2, "tools/list"))
        called = proc.call(request(3, "tools/call", {"name": "list_entries", "arguments": {}}))
        assert proc.close() == 0, proc.stderr
    finally:
        proc.kill()
    assert listed["result"]["tools"]
    assert called["result"]["isError"] is not place.attached
    probe = json.loads(out.read_text())
    out.unlink()
    assert probe["code"] == 0
    top = {name.split(".")[0] for name in probe["modules"]}
    assert not top & set(FORBIDDEN), sorted(top & set(FORBIDDEN))
    inside = [m for m in probe["modules"] if m.startswith(("broker.", "shim."))]
    allowed = {
        "broker.paths",
        "broker.exposure",
        "broker.wire",
        "broker.wire.relay",
        "broker.wire.zmtp",
        "shim.main",
        "shim.zmtp",
    }
    assert set(inside) <= allowed, inside
    assert "shim.zmtp" in inside  # the probe saw the real relay's imports
    # on an ipc:// address the relay speaks ZMTP itself: no libzmq (and no import cost)
    assert "zmq" not in top


def test_the_shim_speaks_the_brokers_wire_protocol() -> None:
    assert shim.main.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert shim.main.MCP_FRAME is relay.MCP_FRAME
    assert shim.main.MCP_DETACHED is relay.MCP_DETACHED


# ---------------------------------------------------------------------- the debug log


@pytest.fixture(scope="module")
def secrets_token(served: tuple[Path, Apm, Broker]) -> str:
    _, apm, _ = served
    out = apm.ok("delegate", "--scope", "secrets", "--ttl", "1h", "--json").stdout
    return str(json.loads(out)["token"])


def log_path(home: Path) -> Path:
    return home / "config" / "mcp_logging.log"


@pytest.mark.parametrize("how", ["--debug", "APM_DEBUG=1"])
def test_the_debug_log_is_private_and_holds_neither_the_token_nor_a_secret(
    served: tuple[Path, Apm, Broker], secrets_token: str, how: str
) -> None:
    home = served[0]
    log = log_path(home)
    log.unlink(missing_ok=True)
    args = ("--debug",) if how == "--debug" else ()
    extra = {"APM_DEBUG": "1"} if how == "APM_DEBUG=1" else {}
    proc = RawShim(home, clean_env(home, APM_EPHEMERAL_ID=secrets_token, **extra), args)
    try:
        handshake(proc)
        got = proc.call(request(2, "tools/call", {"name": "decrypt_entry", "arguments": {}}))
        revealed = proc.call(
            request(3, "tools/call", {"name": "decrypt_entry", "arguments": {"entry": "deploy"}})
        )
        assert proc.close() == 0
    finally:
        proc.kill()
    assert got["result"]["isError"] is True  # a failed call is logged as well
    assert revealed["result"]["structuredContent"]["value"] == SECRET  # the session saw it
    assert log.exists(), "no debug log was written"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert "tools/call" in text  # it logged the session, so what is absent is absent
    assert secrets_token not in text
    assert secrets_token[4:20] not in text
    assert SECRET not in text
    assert SECRET not in proc.stderr
    assert secrets_token not in proc.stderr


def test_without_debug_there_is_no_log(served: tuple[Path, Apm, Broker], read_token: str) -> None:
    home = served[0]
    log = log_path(home)
    log.unlink(missing_ok=True)
    proc = RawShim(home, clean_env(home, APM_EPHEMERAL_ID=read_token))
    try:
        handshake(proc)
        assert proc.close() == 0
    finally:
        proc.kill()
    assert not log.exists()


def test_without_apm_home_the_debug_log_goes_to_the_xdg_config_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APM_", "XDG_"))}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        APM_EPHEMERAL_ID=FAKE_TOKEN,
    )
    (tmp_path / "run").mkdir(mode=0o700)
    proc = RawShim(tmp_path, env, ("--debug",))
    try:
        handshake(proc)
        assert proc.close() == 0
    finally:
        proc.kill()
    log = tmp_path / "xdg" / "apm" / "mcp_logging.log"
    assert log.exists()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert FAKE_TOKEN not in log.read_text()
    assert not (tmp_path / "home" / ".config").exists()


def test_the_event_the_shim_attaches_on_is_the_one_after_which_a_send_goes_through(
    tmp_path: Path,
) -> None:
    """A send fails until the ZMTP handshake is done (as a libzmq DEALER with zmq.IMMEDIATE).
    The shim attaches on the handshake's end (libzmq's HANDSHAKE_SUCCEEDED; CONNECTED came too
    early and left every cold start waiting for the 100 ms retry): the first event its link
    reports is that one, and a send right after it reaches a real libzmq ROUTER."""
    import zmq

    from shim.zmtp import Link

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    addr = f"ipc://{run}/b.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(addr)
    events: list[str] = []
    got: list[list[bytes]] = []
    link = Link(f"{run}/b.sock", got.append, lambda: events.append("up"), lambda: None)
    try:
        assert not link.send((b"too early",))  # refused, not queued
        for _ in range(100):
            if events:
                break
            link.wait(None, 0.05)
        assert events == ["up"]
        assert link.send((b"first",))
        assert router.poll(5000)
        identity, body = router.recv_multipart(copy=False)
        assert body.bytes == b"first"
        peer = body.get("Peer-Address")  # the kernel's credentials, as for a libzmq peer
        assert peer.split(":")[-1] == str(os.getpid())
        router.send_multipart([identity.bytes, b"mcp", b"c1", b"x" * 70_000])
        for _ in range(100):
            if got:
                break
            link.wait(None, 0.05)
        assert got == [[b"mcp", b"c1", b"x" * 70_000]]  # multipart, a long frame included
    finally:
        link.close()
        router.close(linger=0)
        ctx.term()


def test_the_link_tells_a_lost_broker_and_reconnects_to_a_new_one(tmp_path: Path) -> None:
    """The broker going away is reported once (libzmq's DISCONNECTED); a broker bound again
    at the same path is found by the link's own retries and reported up again."""
    import zmq

    from shim.zmtp import Link

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    path = f"{run}/b.sock"
    events: list[str] = []
    ctx = zmq.Context()

    def router() -> zmq.Socket[bytes]:
        r = ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.bind(f"ipc://{path}")
        return r

    def pump(until: int) -> None:
        for _ in range(200):
            if len(events) >= until:
                return
            link.wait(None, 0.05)

    first = router()
    link = Link(
        path, lambda frames: None, lambda: events.append("up"), lambda: events.append("down")
    )
    try:
        pump(1)
        first.close(linger=0)
        pump(2)
        assert events == ["up", "down"]
        assert not link.send((b"lost",))
        second = router()
        try:
            pump(3)
            assert events == ["up", "down", "up"]
            assert link.send((b"again",))
            assert second.poll(5000)
            assert second.recv_multipart()[-1] == b"again"
        finally:
            second.close(linger=0)
    finally:
        link.close()
        ctx.term()


def test_a_peer_that_is_not_a_zmtp_router_is_dropped(tmp_path: Path) -> None:
    """Something else listening at the path (not ZMTP, or not a ROUTER) never counts as up."""
    import socket

    from shim.zmtp import Link

    path = str(tmp_path / "b.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    events: list[str] = []
    link = Link(path, lambda frames: None, lambda: events.append("up"), lambda: None)
    try:
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        for _ in range(10):
            link.wait(None, 0.02)
        assert events == []
        assert not link.ready  # dropped (and retried later, never up)
        assert not link.send((b"x",))
        conn.close()
    finally:
        link.close()
        srv.close()
