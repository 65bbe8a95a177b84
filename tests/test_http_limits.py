"""Resource limits of the HTTP front end, attacked with real processes (#13.4).

- The attack that aborted the broker: one local user holds ~1,100 connections; libzmq's ipc
  listener then hit EMFILE and abort()ed the broker (exit 134, megabytes of stderr). Here the
  broker runs with a hard open-file limit of 512 and gets 700, so raising the soft limit cannot
  hide it: only the caps keep it alive, and `apm status` over the ipc socket must keep
  answering. (Before the caps: "Too many open files (src/ipc_listener.cpp:297)", no answer.)
- Connection and MCP-session caps, per uid and in total: beyond them 503 with Retry-After.
- Idle MCP sessions expire; the soft open-file limit is raised to the hard one at start.
Loops are bounded in count and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from broker.server.limits import HttpLimits

from .conftest import PY, SWEEP_HITS, Apm, clean_env, make_home, sweep
from .test_http import INIT, MCP_HEADERS, HttpBroker, free_port

pytestmark = pytest.mark.slow

FLOOD = 700
FD_LIMIT = 512

# Holds N connections to PORT at once, each with a request under way (headers with the bearer
# token sent, body withheld); on "go" sends the bodies and reports what came back:
# {"held": n} then {"answers": {"503": k, "reset": k, ...}, "retry_after": [...]}
FLOOD_CLIENT = r"""
import json, resource, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
token = sys.stdin.readline().strip()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
head = ("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nAuthorization: Bearer %s\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n" % (port, token)).encode()
socks = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(head)
    except OSError:
        s.close()
        continue
    socks.append(s)
print(json.dumps({"held": len(socks)}), flush=True)
sys.stdin.readline()
answers, retry = {}, []
for s in socks:
    try:
        s.sendall(b"{}")
    except OSError:
        pass
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if not data:
            kind = "reset"
        else:
            lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            kind = lines[0].split()[1]
            if kind == "503":
                retry += [h.split(":", 1)[1].strip() for h in lines[1:]
                          if h.lower().startswith("retry-after:")]
    except OSError:
        kind = "reset"
    answers[kind] = answers.get(kind, 0) + 1
    s.close()
print(json.dumps({"answers": answers, "retry_after": retry}), flush=True)
"""


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def limited(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


class LimitedBroker(HttpBroker):
    """An HTTP broker started with a given RLIMIT_NOFILE and config.toml."""

    nofile: tuple[int, int] = (FD_LIMIT, FD_LIMIT)

    def popen_kw(self) -> dict[str, Any]:
        return {"preexec_fn": limited(*self.nofile)}  # only setrlimit, before exec


def swept(home: Path) -> None:
    """The suite's secret sweep (conftest) over a home this module made, then remove it."""
    try:
        hits = sweep(home)
        SWEEP_HITS.extend(hits)
        assert not hits, f"secrets found in plaintext: {hits[:5]}"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def home_with_config(text: str) -> Path:
    home = make_home()
    (home / "config").mkdir(mode=0o700)
    (home / "config" / "config.toml").write_text(text)
    return home


def limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


@pytest.fixture
def flood_broker() -> Iterator[tuple[LimitedBroker, Apm]]:
    home = make_home()
    broker = LimitedBroker(home, port=free_port()).start()
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        yield broker, apm
    finally:
        broker.stop()
        swept(home)


def test_a_connection_flood_gets_503s_while_the_ipc_socket_keeps_answering(
    flood_broker: tuple[LimitedBroker, Apm],
) -> None:
    broker, apm = flood_broker
    assert broker.proc is not None
    assert limits_of(broker.pid) == (FD_LIMIT, FD_LIMIT)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(FLOOD, hard - 64)
    assert n > FD_LIMIT, "the test process may not open enough sockets to run the attack"
    token = json.loads(apm.ok("delegate", "--ttl", "1h", "--json").stdout)["token"]
    flood = subprocess.Popen(
        [PY, "-c", FLOOD_CLIENT, str(broker.port), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flood.stdin is not None and flood.stdout is not None
    try:
        flood.stdin.write(token + "\n")
        flood.stdin.flush()
        held = json.loads(flood.stdout.readline())["held"]
        assert held > FD_LIMIT, held
        # while the connections are held, the CLI keeps being served over the ipc socket
        for _ in range(3):
            assert apm("status", "--json", timeout=30).returncode == 0, broker.output()[-2000:]
        assert broker.proc.poll() is None, broker.output()[-2000:]
        flood.stdin.write("go\n")
        flood.stdin.flush()
        report = json.loads(flood.stdout.readline())
        flood.wait(timeout=60)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
        flood.stdin.close()
        flood.stdout.close()
    answers = report["answers"]
    assert broker.proc.poll() is None, broker.output()[-2000:]
    served = sum(v for k, v in answers.items() if k not in ("503", "reset"))
    assert served <= 32, answers  # the default per-uid cap
    assert answers.get("503", 0) >= 1, answers
    assert report["retry_after"] and all(int(v) > 0 for v in report["retry_after"])
    assert apm("status", "--json").returncode == 0
    # the refusals are logged, but a flood does not flood the log
    assert len(broker.output()) < 200_000
    # and once the flood is gone, HTTP is served again
    wait_for(
        lambda: (
            httpx2.post(broker.url, headers=MCP_HEADERS, json=INIT, timeout=10).status_code == 401
        ),
        30,
        "HTTP to be served again",
    )


def test_the_broker_raises_its_open_file_soft_limit_to_the_hard_limit() -> None:
    home = make_home()
    broker = LimitedBroker(home, port=free_port())
    broker.nofile = (256, 4096)
    broker.start()
    try:
        assert limits_of(broker.pid) == (4096, 4096)
    finally:
        broker.stop()
        swept(home)


# ------------------------------------------------------------------------------- caps


def test_caps_are_lowered_to_a_quarter_of_the_open_file_limit() -> None:
    fitted = HttpLimits(max_connections=1000, max_connections_per_uid=900).within(1024)
    assert fitted.max_connections == 256
    assert fitted.max_connections_per_uid == 256
    assert HttpLimits().within(1_048_576) == HttpLimits()


CAPS = """
[http]
max_connections = 6
max_connections_per_uid = 3
max_sessions = 4
max_sessions_per_uid = 2
"""


@contextlib.contextmanager
def configured_broker(config: str) -> Iterator[tuple[LimitedBroker, str]]:
    """(broker, a session token): an initialised HTTP broker with `config` as its config.toml
    and room for 4096 open files; stopped and swept after."""
    home = home_with_config(config)
    broker = LimitedBroker(home, port=free_port())
    broker.nofile = (4096, 4096)
    broker.start()
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        token = json.loads(apm.ok("delegate", "--ttl", "1h", "--json").stdout)["token"]
        yield broker, token
    finally:
        broker.stop()
        swept(home)


@pytest.fixture(scope="module")
def capped() -> Iterator[tuple[LimitedBroker, str]]:
    with configured_broker(CAPS) as made:
        yield made


def initialize(client: httpx2.Client, url: str, token: str) -> httpx2.Response:
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    return client.post(url, headers=headers, json=INIT, timeout=20)


def test_connections_over_the_per_uid_cap_get_503_with_retry_after(
    capped: tuple[LimitedBroker, str],
) -> None:
    broker, _ = capped
    # each httpx2 client keeps its one connection open (keep-alive) until closed
    held = [httpx2.Client() for _ in range(3)]
    try:
        for c in held:
            assert c.post(broker.url, json=INIT, timeout=20).status_code == 401
        with httpx2.Client() as extra:
            r = extra.post(broker.url, json=INIT, timeout=20)
            assert r.status_code == 503
            assert int(r.headers["Retry-After"]) > 0
            assert r.json()["code"] == "BUSY"
        held.pop().close()
        # room again: a new connection is served

        def served() -> bool:
            with httpx2.Client() as c:
                return c.post(broker.url, json=INIT, timeout=20).status_code == 401

        wait_for(served, 15, "a freed connection slot")
    finally:
        for c in held:
            c.close()


def test_mcp_sessions_over_the_per_uid_cap_get_503_with_retry_after(
    capped: tuple[LimitedBroker, str],
) -> None:
    broker, token = capped
    with httpx2.Client() as c:
        first = [initialize(c, broker.url, token) for _ in range(2)]
        assert [r.status_code for r in first] == [200, 200]
        ids = [r.headers["mcp-session-id"] for r in first]
        over = initialize(c, broker.url, token)
        assert over.status_code == 503
        assert int(over.headers["Retry-After"]) > 0
        assert "mcp-session-id" not in over.headers
        # ending a session frees its place
        headers = {"Authorization": f"Bearer {token}", "mcp-session-id": ids[0]}
        assert c.delete(broker.url, headers=headers, timeout=20).status_code < 300
        again = wait_for(
            lambda: (r := initialize(c, broker.url, token)).status_code == 200 and r,
            15,
            "a freed session slot",
        )
        for sid in (ids[1], again.headers["mcp-session-id"]):
            c.delete(broker.url, headers={**headers, "mcp-session-id": sid}, timeout=20)


def test_unknown_http_keys_and_bad_caps_in_config_toml_refuse_to_start() -> None:
    for text in ("[http]\nmax_conections = 5\n", "[http]\nmax_connections = 0\n"):
        home = home_with_config(f'{text}listen = "127.0.0.1:{free_port()}"\n')
        try:
            r = subprocess.run(
                [PY, "-m", "broker.server.daemon"],
                env=clean_env(home),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 10, r.stderr
            assert "http" in r.stderr and "Traceback" not in r.stderr
        finally:
            shutil.rmtree(home, ignore_errors=True)


def test_idle_mcp_sessions_expire() -> None:
    config = "[http]\nsession_idle_minutes = 0.05\nmax_sessions = 1\n"
    with configured_broker(config) as (broker, token), httpx2.Client() as c:
        r = initialize(c, broker.url, token)
        assert r.status_code == 200
        sid = r.headers["mcp-session-id"]
        # the only session slot is taken while it lives
        assert initialize(c, broker.url, token).status_code == 503
        headers = {
            **MCP_HEADERS,
            "Authorization": f"Bearer {token}",
            "mcp-session-id": sid,
        }
        ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}

        def expired() -> bool:
            return c.post(broker.url, headers=headers, json=ping, timeout=20).status_code == 404

        # polled with a deadline: the idle timeout is 3 s; a poll every 4 s leaves it idle
        deadline = time.monotonic() + 30
        while not expired():
            assert time.monotonic() < deadline, "the idle session never expired"
            time.sleep(4)
        assert initialize(c, broker.url, token).status_code == 200
