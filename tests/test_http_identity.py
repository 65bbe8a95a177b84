"""Who is on the other end of an HTTP connection: attacks on the peer identity (#13.2, #13.3).

Each test runs the attack with real processes against a real broker serving MCP over HTTP:
- a same-uid process that reuses the source port a pid-bound process just used (SO_REUSEADDR)
  must be identified as itself, not as the process that used the port before;
- a process of another uid must not be served at all, whether the broker runs as root or as
  an ordinary user (whose /proc view hides the other user's pid).
The attacking clients are tests/http_raw_client.py (stdlib only), so another user can run them
with any Python 3; the token always travels on stdin.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import PASSWORD, PY, SWEEP_HITS, end_child, register_secret, sweep
from .other_uid import (
    NOBODY,
    PLAIN_ENV,
    as_user,
    ensure_user,
    need_root,
    public_dir,
    publish,
    python_for,
)
from .test_http import SECRET, World, free_port, wait_listening
from .test_http import world as world  # the module-scoped broker fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAW_CLIENT = Path(__file__).resolve().parent / "http_raw_client.py"
ATTACKER_USER = "apmhttpx"  # the other local user
BROKER_USER = "apmhttpb"  # runs a non-root broker


@functools.cache
def other_python() -> str:
    """A Python of this interpreter's version that any user may run (the venv's may sit under a
    private directory, like /root/.pyenv here): the broker's C extensions need the same 3.x."""
    found = python_for(NOBODY)
    want = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert found, f"no {want} that other users may run; install it (apt-get install {want})"
    return found


def raw(
    port: int,
    token: str,
    *,
    tool: str | None = None,
    args: dict[str, Any] | None = None,
    src_port: int = 0,
    user: str | None = None,
    python: str = PY,
    script: Path = RAW_CLIENT,
) -> dict[str, Any]:
    """Run the raw client once (as `user` when given) and return what it saw."""
    argv = [python, str(script), "--port", str(port), "--src-port", str(src_port)]
    if tool:
        argv += ["--tool", tool, "--args", json.dumps(args or {})]
    kw = as_user(pwd.getpwnam(user)) if user is not None else {}
    proc = subprocess.run(
        argv,
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=PLAIN_ENV,
        **kw,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def decrypt_github_as(user: str, script: Path, port: int, token: str) -> dict[str, Any]:
    """decrypt_entry github with `token`, from the raw client run as `user` (a public copy)."""
    return raw(
        port,
        token,
        tool="decrypt_entry",
        args={"entry": "github"},
        user=user,
        python=other_python(),
        script=script,
    )


def call_result(out: dict[str, Any]) -> dict[str, Any] | None:
    """The tools/call result the raw client got, or None if it got none."""
    for step in out["steps"]:
        body = step.get("body")
        if isinstance(body, dict) and body.get("id") == 3 and "result" in body:
            return dict(body["result"])
    return None


def tool_code(result: dict[str, Any] | None) -> str | None:
    if result is None:
        return None
    if not result.get("isError"):
        return "OK"
    error = (result.get("_meta") or {}).get("apm/error")  # errors carry no structuredContent
    return str((error or {}).get("code"))


@pytest.fixture(scope="module")
def needs_root() -> None:
    need_root()


@pytest.fixture(scope="module")
def attacker(needs_root: None) -> pwd.struct_passwd:
    return ensure_user(ATTACKER_USER)


@pytest.fixture(scope="module")
def public_client(needs_root: None) -> Iterator[Path]:
    """The raw client where any user can read it."""
    with public_dir("apmraw-") as work:
        yield publish(RAW_CLIENT, work / "http_raw_client.py")


# ------------------------------------------------------------------ #13.2 source-port reuse


class Holder:
    """A pid-bound process: makes its own calls from a chosen source port, then stays alive
    (so its pid stays valid) until released."""

    def __init__(
        self,
        port: int,
        src_port: int,
        user: pwd.struct_passwd | None = None,
        python: str = PY,
        script: Path = RAW_CLIENT,
    ) -> None:
        kw = as_user(user) if user is not None else {}
        self.proc = subprocess.Popen(
            [
                *(python, str(script), "--port", str(port), "--src-port", str(src_port)),
                *("--tool", "search_entries", "--args", json.dumps({"query": "git"})),
                *("--rst", "--hold"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **kw,
        )

    def run(self, token: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def release(self) -> None:
        end_child(self.proc)


def test_a_process_reusing_the_source_port_of_a_pid_bound_client_is_identified_as_itself(
    world: World,
) -> None:
    src_port = free_port()
    holder = Holder(world.broker.port, src_port)
    try:
        token, accessor = world.delegate("--scope", "read", "--pid", str(holder.proc.pid))
        own = holder.run(token)
        # control: the bound process itself is served, from that port
        assert own["src_port"] == src_port
        assert tool_code(call_result(own)) == "OK", own
        # the attack: another process (same uid, outside the bound tree) binds the same
        # source port with SO_REUSEADDR right after, and presents the stolen token
        stolen = raw(
            world.broker.port,
            token,
            tool="search_entries",
            args={"query": "git"},
            src_port=src_port,
        )
        assert stolen["src_port"] == src_port
        result = call_result(stolen)
        assert tool_code(result) == "SESSION_REQUIRED", stolen
        assert "github" not in json.dumps(stolen)
        denial = json.loads(world.apm.ok("session", "why", accessor, "--json").stdout)
        last = denial["denials"][-1]
        assert last["peer_pid"] == stolen["pid"]
        assert last["reason"].startswith("pid binding")
    finally:
        holder.release()


# ----------------------------------------------------------------- #13.3 other-uid clients


def test_a_client_of_another_uid_is_refused_by_a_root_broker(
    world: World, attacker: pwd.struct_passwd, public_client: Path
) -> None:
    assert os.getuid() == 0
    token, _ = world.delegate("--scope", "secrets")
    out = decrypt_github_as(attacker.pw_name, public_client, world.broker.port, token)
    assert SECRET not in json.dumps(out)
    # refused at accept: no HTTP answer at all, not even a 401 or 403
    assert out["steps"] == [] and "error" in out, out
    assert f"uid {attacker.pw_uid}" in world.broker.output()
    # control: the same request from our own uid is served
    mine = raw(world.broker.port, token, tool="decrypt_entry", args={"entry": "github"})
    assert tool_code(call_result(mine)) == "OK", mine


@dataclass
class UserBroker:
    """A broker and CLI running as an ordinary user (not root), from a world-readable copy of
    the code: /usr/bin/python3 with PYTHONPATH = this checkout + the venv's site-packages."""

    user: pwd.struct_passwd
    home: Path
    pythonpath: str
    port: int
    proc: subprocess.Popen[str] | None = None

    def _kw(self) -> dict[str, Any]:
        return {
            **as_user(self.user, self.home),
            "env": {
                "PATH": "/usr/bin:/bin",
                "HOME": str(self.home),
                "APM_HOME": str(self.home / "apm"),
                "PYTHONPATH": self.pythonpath,
            },
        }

    def apm(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [other_python(), "-m", "broker.cli.main", *args, "--password-stdin"],
            input=PASSWORD + "\n" + stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            **self._kw(),
        )
        assert proc.returncode == 0, proc.stderr
        for line in proc.stdout.split():
            if line.startswith("eps_") or '"eps_' in line:
                register_secret(line.strip('",'))
        return proc

    def start(self) -> None:
        log = open(self.home / "broker.out", "w")  # noqa: SIM115  (closed with the process)
        self.proc = subprocess.Popen(
            [
                *(other_python(), "-m", "broker.cli.main", "broker", "run"),
                *("--http", f"127.0.0.1:{self.port}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            **self._kw(),
        )
        log.close()
        try:
            wait_listening(self.port, "the non-root broker", 30, self.proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.output()}") from None

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.home / "broker.out").read_text()
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _readable_code(spare: Path) -> str:
    """PYTHONPATH entries the broker's user can read: this checkout and the venv's
    site-packages, copied under `spare` (its own directory) when they sit somewhere private."""
    import pydantic  # any installed package: its parent is site-packages

    site = str(Path(pydantic.__file__).resolve().parent.parent)
    paths = [str(ROOT), site]
    probe = subprocess.run(
        [other_python(), "-c", "import sys; import broker, zmq, mcp, argon2, psutil"],
        env={**PLAIN_ENV, "PYTHONPATH": ":".join(paths)},
        capture_output=True,
        timeout=60,
        check=False,
        **as_user(pwd.getpwnam(BROKER_USER)),
    )
    if probe.returncode == 0:
        return ":".join(paths)
    copy = spare / "code"
    shutil.copytree(ROOT / "broker", copy / "src" / "broker")
    shutil.copytree(site, copy / "site", symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True, timeout=120)
    return f"{copy / 'src'}:{copy / 'site'}"


@pytest.fixture(scope="module")
def user_broker(needs_root: None) -> Iterator[UserBroker]:
    user = ensure_user(BROKER_USER)
    base = Path(tempfile.mkdtemp(prefix="apmu-", dir="/tmp"))
    os.chown(base, user.pw_uid, user.pw_gid)
    base.chmod(0o700)
    b = UserBroker(user, base, _readable_code(base), free_port())
    try:
        b.start()
        b.apm("init", "--profile", "interactive")
        b.apm(
            "add",
            "login",
            "github",
            "--field",
            "username=octo",
            "--from-stdin",
            stdin=SECRET + "\n",
        )
        yield b
    finally:
        b.stop()
        hits = sweep(base / "apm")
        SWEEP_HITS.extend(hits)
        shutil.rmtree(base, ignore_errors=True)
        assert not hits, f"secrets found in plaintext: {hits[:5]}"


def test_a_client_of_another_uid_is_refused_by_a_non_root_broker(
    user_broker: UserBroker, attacker: pwd.struct_passwd, public_client: Path
) -> None:
    out = user_broker.apm("delegate", "--scope", "secrets", "--ttl", "1h", "--json")
    token = json.loads(out.stdout)["token"]
    # the attack: another user (its pid is invisible to this broker) presents the token
    stolen = decrypt_github_as(attacker.pw_name, public_client, user_broker.port, token)
    assert SECRET not in json.dumps(stolen)
    assert stolen["steps"] == [] and "error" in stolen, stolen
    # root is another user too for this broker
    as_root = raw(user_broker.port, token, tool="decrypt_entry", args={"entry": "github"})
    assert SECRET not in json.dumps(as_root)
    assert as_root["steps"] == [] and "error" in as_root, as_root
    assert f"uid {attacker.pw_uid}" in user_broker.output()
    # control: the broker's own user is served
    mine = decrypt_github_as(user_broker.user.pw_name, public_client, user_broker.port, token)
    assert tool_code(call_result(mine)) == "OK", mine
    assert SECRET in json.dumps(mine)


def test_a_non_root_broker_identifies_its_own_users_processes_for_pid_bindings(
    user_broker: UserBroker, public_client: Path
) -> None:
    """The same source-port attack against a broker that is not root: it can read only its own
    user's /proc/<pid>/fd, which is all it needs."""
    src_port = free_port()
    holder = Holder(user_broker.port, src_port, user_broker.user, other_python(), public_client)
    try:
        out = user_broker.apm(
            "delegate", "--scope", "read", "--ttl", "1h", "--pid", str(holder.proc.pid), "--json"
        )
        token = json.loads(out.stdout)["token"]
        own = holder.run(token)
        assert tool_code(call_result(own)) == "OK", own
        stolen = raw(
            user_broker.port,
            token,
            tool="search_entries",
            args={"query": "git"},
            src_port=src_port,
            user=user_broker.user.pw_name,
            python=other_python(),
            script=public_client,
        )
        assert stolen["src_port"] == src_port
        assert tool_code(call_result(stolen)) == "SESSION_REQUIRED", stolen
        assert "github" not in json.dumps(stolen)
    finally:
        holder.release()
