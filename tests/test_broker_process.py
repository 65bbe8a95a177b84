"""The broker as a process: socket and directory modes, one broker per socket, signals,
hardening, foreign peers refused, hostile bytes on the wire, and auto-lock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from broker.wire import errors
from broker.wire.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Request

from .conftest import PY, Apm, Broker, clean_env, make_home
from .other_uid import NOBODY, PLAIN_ENV, as_user, public_dir, publish, python_for

pytestmark = pytest.mark.slow

T = TypeVar("T")
NOBODY_UID = NOBODY
SECRET = "wire-s3cret-7c1d9e-DO-NOT-ECHO"


# ---------------------------------------------------------------------- helpers


def wait_for(fn: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `fn` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def log_text(home: Path) -> str:
    path = home / "state" / "broker.log"
    return path.read_text() if path.exists() else ""


def status(apm: Apm) -> dict[str, Any]:
    proc = apm("status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def run_daemon(home: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run apm-broker in the foreground, expecting it to refuse to start."""
    return subprocess.run(
        [PY, "-m", "broker.server.daemon"],
        env=clean_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ping_bytes() -> tuple[str, bytes]:
    req = Request(v=PROTOCOL_VERSION, method="broker.ping", client="test-raw")
    return req.id, req.encode()


class RawClient:
    """A bare DEALER on the broker socket that sends whatever bytes it is given."""

    def __init__(self, socket: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{socket}")

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float) -> bytes | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        data: bytes = self.sock.recv()
        return data

    def call(self, raw: bytes, timeout: float = 10.0) -> dict[str, Any]:
        self.send(raw)
        reply = self.recv(timeout)
        assert reply is not None, "the broker did not answer"
        assert_no_traceback(reply)
        doc: dict[str, Any] = json.loads(reply)
        return doc

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_no_traceback(reply: bytes) -> None:
    assert b"Traceback" not in reply
    assert b'File "' not in reply


def assert_answers_ping(b: Broker) -> None:
    assert b.proc is not None and b.proc.poll() is None, "the broker died"
    rid, raw = ping_bytes()
    with RawClient(b.socket) as c:
        doc = c.call(raw)
    assert doc["ok"] is True
    assert doc["id"] == rid
    assert doc["result"]["pid"] == b.pid


# ---------------------------------------------------------------------- socket and directory


def test_runtime_dir_is_0700_and_socket_0600_while_running(broker: Broker, home: Path) -> None:
    run_dir = home / "run"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    st = broker.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    lock = broker.socket.with_name(broker.socket.name + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def _dir_0755(home: Path) -> Path:
    run_dir = home / "run"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    return run_dir


def _dir_symlink(home: Path) -> Path:
    target = home / "elsewhere"
    target.mkdir(mode=0o700)
    (home / "run").symlink_to(target)
    return target


def _dir_foreign_owner(home: Path) -> Path:
    if os.getuid() != 0:
        pytest.skip("needs root to give the socket directory to another user")
    run_dir = home / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY_UID, NOBODY_UID)
    return run_dir


@pytest.mark.parametrize(
    "prepare",
    [_dir_0755, _dir_symlink, _dir_foreign_owner],
    ids=["mode-0755", "symlink", "other-owner"],
)
def test_broker_refuses_to_start_on_an_unsafe_socket_dir(
    home: Path, prepare: Callable[[Path], Path]
) -> None:
    where = prepare(home)
    proc = run_daemon(home)
    assert proc.returncode == errors.StorageError.exit_code, proc.stderr
    assert "apm-broker: error:" in proc.stderr
    assert str(home / "run") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (where / "broker.sock").exists()


def test_second_broker_on_the_same_home_exits_naming_the_running_one(
    broker: Broker, home: Path
) -> None:
    proc = run_daemon(home)
    assert proc.returncode == errors.BrokerRunning.exit_code, proc.stderr
    assert "apm-broker: error:" in proc.stderr
    assert f"pid {broker.pid}" in proc.stderr
    # the first broker and its socket are untouched
    assert broker.socket.exists()
    assert_answers_ping(broker)


def test_socket_left_by_a_killed_broker_is_replaced_by_the_next(home: Path) -> None:
    first = Broker(home).start()
    first_pid = first.pid
    first.kill9()
    assert first.socket.exists(), "SIGKILL should leave the socket file behind"
    second = Broker(home).start()
    try:
        assert second.pid != first_pid
        assert_answers_ping(second)
        assert "replacing stale socket" in log_text(home)
    finally:
        assert second.stop() == 0


# ---------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_broker_cleanly_and_locks_the_vault(
    vault: Broker, apm: Apm, home: Path, sig: int
) -> None:
    assert status(apm)["locked"] is False
    lock_file = vault.socket.with_name(vault.socket.name + ".lock")
    assert lock_file.exists()
    assert vault.stop(sig) == 0
    assert not vault.socket.exists()
    assert not lock_file.exists()
    assert "broker stopped; vault locked" in log_text(home)
    assert "Traceback" not in vault.output()


# ---------------------------------------------------------------------- hardening


def test_running_broker_has_core_dumps_off_and_is_not_dumpable(
    vault: Broker, apm: Apm, home: Path
) -> None:
    limits = Path(f"/proc/{vault.pid}/limits").read_text().splitlines()
    core = [line for line in limits if line.startswith("Max core file size")]
    assert len(core) == 1
    assert core[0].split()[4:6] == ["0", "0"]

    hardening = status(apm)["hardening"]
    assert hardening["dumpable"] is False
    assert hardening["core_limit"] == 0


def test_files_the_broker_creates_are_private(vault: Broker, apm: Apm, home: Path) -> None:
    apm.ok("add", "api_key", "k1", "--from-stdin", stdin="v1\n")  # the vault's WAL has it
    wal, shm = home / "vault.apm-wal", home / "vault.apm-shm"
    for path in (home / "vault.apm", wal, shm, home / "state" / "broker.log"):
        assert path.exists(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (home / "state", home / "run"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


# ---------------------------------------------------------------------- peers of another uid


def _zmq_for_nobody(work: Path) -> str:
    """A copy of pyzmq (and its bundled libzmq) that user nobody can read: the venv may sit in
    a directory only we can enter (a CI checkout under a private temporary directory)."""
    site = Path(zmq.__file__).resolve().parent.parent
    dest = work / "site"
    for name in ("zmq", "pyzmq.libs"):
        if (site / name).exists():
            publish(site / name, dest / name)
    return str(dest)


def _nobody_python(site_dir: str, work: Path) -> str | None:
    """An interpreter user nobody can run that imports zmq from the venv, or None."""
    return python_for(NOBODY_UID, f"sys.path.insert(0, {site_dir!r})\nimport zmq", work)


NOBODY_CLIENT = """\
import sys
sys.path.insert(0, sys.argv[3])
import zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
sock.send(bytes.fromhex(sys.argv[2]))
sys.stdout.write("REPLY" if sock.poll(1500) else "NOREPLY")
sock.close(linger=0)
ctx.term()
"""


@pytest.fixture
def nobody_workdir() -> Iterator[Path]:
    with public_dir("apmn-") as work:
        yield work


def test_peer_with_another_uid_gets_no_answer_and_is_logged(
    broker: Broker, home: Path, nobody_workdir: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    site_dir = _zmq_for_nobody(nobody_workdir)
    interp = _nobody_python(site_dir, nobody_workdir)
    if interp is None:
        pytest.skip("no Python interpreter that user nobody may run can import zmq from the venv")

    # open the path to other users, only for this test: the broker checked modes at start
    home.chmod(0o711)
    (home / "run").chmod(0o711)
    broker.socket.chmod(0o666)

    script = nobody_workdir / "client.py"
    script.write_text(NOBODY_CLIENT)
    script.chmod(0o644)
    _, raw = ping_bytes()
    proc = subprocess.run(
        [interp, "-I", str(script), f"ipc://{broker.socket}", raw.hex(), site_dir],
        env=PLAIN_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        **as_user(NOBODY_UID, nobody_workdir),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "NOREPLY"
    wait_for(
        lambda: f"dropped message from peer uid={NOBODY_UID}" in log_text(home),
        timeout=5,
        what="the dropped-peer log line",
    )
    # control: the same request from our own uid is answered
    assert_answers_ping(broker)


# ---------------------------------------------------------------------- hostile bytes


@pytest.fixture(scope="module")
def shared_broker() -> Iterator[Broker]:
    home = make_home()
    b = Broker(home).start()
    yield b
    b.stop()
    shutil.rmtree(home, ignore_errors=True)


def _req(**doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _too_large() -> bytes:
    return Request(
        v=PROTOCOL_VERSION, method="broker.ping", params={"pad": "x" * MAX_FRAME_BYTES}
    ).encode()


BAD_INPUT = [
    ("not-json", b"\xff\xfe this is not json", "INVALID_PARAMETERS"),
    ("empty-frame", b"", "INVALID_PARAMETERS"),
    ("json-array", b'[{"v": 1, "method": "broker.ping"}]', "INVALID_PARAMETERS"),
    ("json-string", b'"broker.ping"', "INVALID_PARAMETERS"),
    ("too-large", _too_large(), "REQUEST_TOO_LARGE"),
    ("unknown-method", _req(v=1, id="r1", method="vault.explode"), "INVALID_PARAMETERS"),
    ("no-method", _req(v=1, id="r2"), "INVALID_PARAMETERS"),
    ("missing-param", _req(v=1, id="r3", method="space.add", params={}), "INVALID_PARAMETERS"),
    ("params-not-object", _req(v=1, method="broker.ping", params="x"), "INVALID_PARAMETERS"),
    ("unknown-param", _req(v=1, method="broker.ping", params={"a": 1}), "INVALID_PARAMETERS"),
    ("unknown-envelope-key", _req(v=1, method="broker.ping", extra=1), "INVALID_PARAMETERS"),
    (
        "secret-in-bad-auth",
        _req(v=1, method="vault.unlock", auth={"password": SECRET, "pin": SECRET}),
        "INVALID_PARAMETERS",
    ),
    (
        "secret-in-bad-params",
        _req(v=1, method="entry.list", params={"offset": SECRET, "space": SECRET + "!"}),
        "INVALID_PARAMETERS",
    ),
    ("version-too-new", _req(v=99, method="broker.ping", client="future/9"), "UNSUPPORTED_VERSION"),
    ("version-zero", _req(v=0, method="broker.ping"), "UNSUPPORTED_VERSION"),
    ("version-missing", _req(method="broker.ping"), "UNSUPPORTED_VERSION"),
    ("version-string", _req(v="1", method="broker.ping"), "UNSUPPORTED_VERSION"),
]


@pytest.mark.parametrize(("raw", "code"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_a_stable_error_code_and_the_broker_stays_up(
    shared_broker: Broker, raw: bytes, code: str
) -> None:
    with RawClient(shared_broker.socket) as c:
        doc = c.call(raw)
    assert doc["ok"] is False
    assert doc["error"]["code"] == code
    assert SECRET not in json.dumps(doc)
    assert_answers_ping(shared_broker)


def test_unknown_method_error_answers_the_request_id(shared_broker: Broker) -> None:
    with RawClient(shared_broker.socket) as c:
        doc = c.call(_req(v=1, id="abc123", method="vault.explode"))
    assert doc["id"] == "abc123"
    assert doc["error"]["code"] == "INVALID_PARAMETERS"


def test_missing_params_error_names_the_field(shared_broker: Broker) -> None:
    with RawClient(shared_broker.socket) as c:
        doc = c.call(_req(v=1, method="space.add", params={}))
    assert doc["error"]["code"] == "INVALID_PARAMETERS"
    assert doc["error"]["data"]["fields"] == ["name"]


def test_unsupported_version_error_names_the_client_and_broker_versions(
    shared_broker: Broker,
) -> None:
    with RawClient(shared_broker.socket) as c:
        doc = c.call(_req(v=99, method="broker.ping", client="future/9"))
    err = doc["error"]
    assert err["code"] == "UNSUPPORTED_VERSION"
    assert err["data"]["client_protocol"] == 99
    assert err["data"]["max_protocol"] == PROTOCOL_VERSION
    assert "99" in err["message"]
    assert str(PROTOCOL_VERSION) in err["message"]


def test_deeply_nested_json_gets_an_error_not_a_crash(shared_broker: Broker) -> None:
    with RawClient(shared_broker.socket) as c:
        doc = c.call(b"[" * 200_000)
    assert doc["ok"] is False
    assert doc["error"]["code"] in errors.ERRORS
    assert_answers_ping(shared_broker)


@pytest.mark.parametrize(
    "frames",
    [
        [b'{"v": 1, "method": "broker.ping"}', b"second frame"],
        [b"", b'{"v": 1, "method": "broker.ping"}'],
    ],
    ids=["two-frames", "empty-then-request"],
)
def test_multi_frame_message_is_dropped(shared_broker: Broker, frames: list[bytes]) -> None:
    with RawClient(shared_broker.socket) as c:
        c.send(*frames)
        assert c.recv(timeout=0.75) is None
    assert_answers_ping(shared_broker)
    assert "dropped message with 2 frames" in log_text(shared_broker.home)


def test_frame_beyond_the_hard_cap_is_dropped_without_an_answer(shared_broker: Broker) -> None:
    with RawClient(shared_broker.socket) as c:
        c.send(b"x" * (4 * MAX_FRAME_BYTES + 1))
        reply = c.recv(timeout=1.0)
    assert reply is None or json.loads(reply)["error"]["code"] == "REQUEST_TOO_LARGE"
    assert_answers_ping(shared_broker)


# ---------------------------------------------------------------------- auto-lock and config


def _write_config(home: Path, text: str) -> None:
    config = home / "config"
    config.mkdir(mode=0o700, exist_ok=True)
    (config / "config.toml").write_text(text)


def test_vault_auto_locks_after_the_configured_idle_time(home: Path, apm: Apm) -> None:
    # 3 s: an unlock's own work after the key is in (restore, checks, sync) took over 1.2 s
    # under load once, and the vault idled out before the unlock answered (VAULT_LOCKED)
    _write_config(home, "[lock]\nidle_minutes = 0.05\n")
    b = Broker(home).start()
    try:
        apm.ok("init", "--profile", "interactive")
        before = datetime.now(UTC)
        unlocked = json.loads(apm.ok("unlock", "--json").stdout)
        idle_in = datetime.fromisoformat(unlocked["idle_lock_at"]) - before
        assert timedelta(0) < idle_in < timedelta(seconds=3 + 10)  # the config is in force
        wait_for(lambda: status(apm)["locked"], timeout=20, what="the vault to auto-lock")
        locked = apm("ls", password="x")
        assert locked.returncode == errors.VaultLocked.exit_code
        assert b.proc is not None and b.proc.poll() is None
    finally:
        assert b.stop() == 0


@pytest.mark.parametrize(
    "config",
    [
        "[lock]\nidle_minutes = 'soon'\n",
        "[lock]\nidle_minutes = -1\n",
        "[lock]\nmax_hours = 0\n",
        "[lock\nidle_minutes = 1\n",
        "lock = 5\n",
        "[lock]\nidle_minutes = nan\n",
        "[lock]\nidle_minutes = inf\n",
        "[lock]\nmax_hours = 1e300\n",
        "[lock]\nidle_minutes = 1e12\n",  # a date 1.9 million years away
        "[sessions]\nmax_ttl_days = nan\n",
    ],
    ids=[
        "string",
        "negative",
        "zero",
        "bad-toml",
        "not-a-table",
        "nan",
        "inf",
        "overflow",
        "beyond-datetime",
        "session-ttl-nan",
    ],
)
def test_invalid_config_makes_the_broker_refuse_to_start(home: Path, config: str) -> None:
    _write_config(home, config)
    proc = run_daemon(home)
    assert proc.returncode == errors.InvalidParameters.exit_code, proc.stderr
    assert "apm-broker: error:" in proc.stderr
    assert "config.toml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "run" / "broker.sock").exists()
