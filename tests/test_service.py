"""The broker as a user service: the systemd unit as installed, the launchd plist,
`apm broker install|uninstall|status` into a temporary HOME, and sd_notify readiness.

No service manager runs here, and a test must never enable a real one: every install test puts a
fake `systemctl` first on PATH. Offline, it makes `apm broker install` fall back to a background
process; "running", it plays a systemd user manager — it records its argv, and `enable --now`
starts the unit's own ExecStart (with its Environment=) the way systemd would. Waits poll with a
deadline; none sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import psutil
import pytest

from broker.cli import service
from broker.wire.errors import BrokerUnavailable

from .conftest import PY, Apm, Broker, clean_env

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed on this machine"
)
# what systemd-analyze says about a directive or section it does not understand
VERIFY_WARNINGS = ("unknown key", "unknown section", "ignoring", "invalid", "failed to parse")
DEADLINE = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_quietly(pid: int | None) -> None:
    if pid and alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5)


def directives(unit_text: str) -> dict[str, list[str]]:
    """`Section.Key` -> values, in order (a unit may repeat a key)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    values = d.get(key, [])
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` in system mode (`--user` needs a running user manager).

    --man=no: the unit's Documentation=man:apm(1) names a man page apm does not ship, which
    verify reports as an error (see the report of issue 7); everything else is checked.
    """
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_verifies_cleanly(unit: Path) -> None:
    r = verify(unit)
    assert r.returncode == 0, r.stderr
    noise = [w for w in VERIFY_WARNINGS if w in r.stderr.lower()]
    assert not noise, f"systemd-analyze warned ({noise}): {r.stderr}"


FAKE_SYSTEMCTL = """\
#!{python}
# A stand-in for `systemctl --user`: records argv; FAKE_SYSTEMCTL_MODE=offline|running|enable-fails
import json, os, shlex, signal, subprocess, sys, time
args = sys.argv[1:]
state = os.environ["FAKE_SYSTEMCTL_DIR"]
mode = os.environ.get("FAKE_SYSTEMCTL_MODE", "offline")
with open(os.path.join(state, "argv.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
pidfile = os.path.join(state, "broker.pid")
unit = os.path.join(os.environ["XDG_CONFIG_HOME"], "systemd", "user", "apm-broker.service")

def pid():
    try:
        return int(open(pidfile).read())
    except (OSError, ValueError):
        return None

def running(p):
    try:
        with open(f"/proc/{{p}}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False

def start():
    env = dict(os.environ)
    exec_start = None
    for line in open(unit):
        key, _, value = line.strip().partition("=")
        if key == "ExecStart":
            exec_start = shlex.split(value)
        elif key == "Environment":
            k, _, v = value.partition("=")
            env[k] = v
    out = open(os.path.join(state, "broker.out"), "a")
    p = subprocess.Popen(exec_start, env=env, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=out, start_new_session=True)
    open(pidfile, "w").write(str(p.pid))

def stop():
    p = pid()
    if p and running(p):
        os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while running(p) and time.monotonic() < deadline:
            time.sleep(0.05)

if args[:2] == ["--user", "is-system-running"]:
    print("offline" if mode == "offline" else "running")
    sys.exit(1 if mode == "offline" else 0)
if mode == "offline":
    print("System has not been booted with systemd as init system (PID 1).", file=sys.stderr)
    sys.exit(1)
cmd = args[1:]
if cmd[:2] == ["enable", "--now"]:
    if mode == "enable-fails":
        print("Failed to enable unit: Unit apm-broker.service is masked.", file=sys.stderr)
        sys.exit(1)
    start()
elif cmd[:1] == ["start"]:
    start()
elif cmd[:2] == ["disable", "--now"] or cmd[:1] == ["stop"]:
    stop()
elif cmd[:1] == ["is-active"]:
    p = pid()
    print("active" if p and running(p) else "inactive")
    sys.exit(0 if p and running(p) else 3)
sys.exit(0)
"""


@dataclass
class ServiceEnv:
    """A temporary HOME (and XDG_CONFIG_HOME) with a fake systemctl first on PATH."""

    home: Path  # also APM_HOME, so the broker's files stay in the test's directory
    mode: str = "offline"

    @property
    def user_home(self) -> Path:
        return self.home / "h"

    @property
    def fake_dir(self) -> Path:
        return self.home / "fake"

    @property
    def unit(self) -> Path:
        return self.user_home / ".config" / "systemd" / "user" / service.UNIT_NAME

    @property
    def env(self) -> dict[str, str]:
        return clean_env(
            self.home,
            HOME=str(self.user_home),
            XDG_CONFIG_HOME=str(self.user_home / ".config"),
            PATH=f"{self.fake_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            FAKE_SYSTEMCTL_DIR=str(self.fake_dir),
            FAKE_SYSTEMCTL_MODE=self.mode,
        )

    def setup(self) -> ServiceEnv:
        self.user_home.mkdir(parents=True, exist_ok=True)
        self.fake_dir.mkdir(parents=True, exist_ok=True)
        fake = self.fake_dir / "systemctl"
        fake.write_text(FAKE_SYSTEMCTL.format(python=PY))
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        return self

    def apm(self, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        return Apm(self.home)(*args, env=self.env, password=password)

    def calls(self) -> list[list[str]]:
        log = self.fake_dir / "argv.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def fake_broker_pid(self) -> int | None:
        pidfile = self.fake_dir / "broker.pid"
        return int(pidfile.read_text()) if pidfile.exists() else None


@pytest.fixture
def svc(home: Path) -> Iterator[ServiceEnv]:
    env = ServiceEnv(home).setup()
    yield env
    # whatever happened, leave no broker behind
    env.apm("broker", "stop")
    kill_quietly(env.fake_broker_pid())


def install(svc: ServiceEnv, *args: str) -> dict[str, object]:
    r = svc.apm("broker", "install", "--json", *args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


# ------------------------------------------------------------------------------ unit contents


def test_the_repo_unit_file_is_what_render_unit_writes_by_default() -> None:
    assert (ROOT / "systemd" / "apm-broker.service").read_text() == service.render_unit()


def test_the_repo_launch_agent_is_what_render_plist_writes_for_a_standard_install() -> None:
    shipped = (ROOT / "launchd" / f"{service.AGENT_LABEL}.plist").read_bytes()
    assert shipped == service.render_plist("/usr/local/bin/apm-broker", Path("/Users/USER"))


def test_the_launch_agent_runs_at_load_is_kept_alive_interactive_and_logs_to_files(
    tmp_path: Path,
) -> None:
    doc = plistlib.loads(service.render_plist("/opt/apm/bin/apm-broker", tmp_path))
    assert doc["Label"] == service.AGENT_LABEL == "dev.apm.broker"
    assert doc["ProgramArguments"] == ["/opt/apm/bin/apm-broker"]
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] is True
    assert doc["ProcessType"] == "Interactive"
    logs = tmp_path / "Library" / "Logs" / "apm"
    assert doc["StandardOutPath"] == str(logs / "broker.out.log")
    assert doc["StandardErrorPath"] == str(logs / "broker.err.log")
    assert doc["Umask"] == 0o077
    assert doc["SoftResourceLimits"] == doc["HardResourceLimits"] == {"Core": 0}


def test_the_launch_agent_carries_the_apm_environment_when_given(tmp_path: Path) -> None:
    doc = plistlib.loads(service.render_plist("/x/apm-broker", tmp_path, {"APM_HOME": "/data/apm"}))
    assert doc["EnvironmentVariables"] == {"APM_HOME": "/data/apm"}


def test_render_unit_allows_inet_families_only_when_http_is_enabled() -> None:
    plain = directives(service.render_unit("/x/apm-broker"))
    http = directives(service.render_unit("/x/apm-broker", http="127.0.0.1:8765"))
    assert one(plain, "Service.RestrictAddressFamilies") == "AF_UNIX"
    assert one(plain, "Service.ExecStart") == "/x/apm-broker"
    assert one(http, "Service.RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert one(http, "Service.ExecStart") == "/x/apm-broker --http 127.0.0.1:8765"


def test_the_unit_has_systemd_create_its_runtime_directory_on_each_start() -> None:
    d = directives(service.render_unit("/x/apm-broker"))
    writable = one(d, "Service.ReadWritePaths").split()
    managed = d.get("Service.RuntimeDirectory") == ["apm"]
    if managed:
        assert one(d, "Service.RuntimeDirectoryMode") == "0700"
    assert managed or "%t" in writable, "nothing makes %t/apm exist and writable at start"


# --------------------------------------------------------------- install into a temporary HOME


def assert_hardened(unit: Path) -> dict[str, list[str]]:
    d = directives(unit.read_text())
    expected = {
        "Service.Type": "notify",
        "Service.Restart": "on-failure",
        "Service.LimitCORE": "0",
        "Service.UMask": "0077",
        "Service.NoNewPrivileges": "yes",
        "Service.PrivateTmp": "yes",
        "Service.ProtectSystem": "strict",
        "Service.LockPersonality": "yes",
        "Install.WantedBy": "default.target",
    }
    assert {k: one(d, k) for k in expected} == expected
    exe = shlex.split(one(d, "Service.ExecStart"))[0]
    assert os.path.isabs(exe)
    assert os.access(exe, os.X_OK), f"ExecStart {exe} is not an executable file"
    assert Path(exe).name == "apm-broker"
    assert one(d, "Service.ReadWritePaths")
    return d


@pytest.mark.slow
@needs_systemd_analyze
def test_the_installed_unit_verifies_cleanly_and_is_hardened(svc: ServiceEnv) -> None:
    doc = install(svc)
    assert doc["files"] == [str(svc.unit)]
    d = assert_hardened(svc.unit)
    assert one(d, "Service.RestrictAddressFamilies") == "AF_UNIX"
    assert_verifies_cleanly(svc.unit)


@pytest.mark.slow
@needs_systemd_analyze
def test_the_installed_unit_with_http_allows_inet_and_verifies_cleanly(svc: ServiceEnv) -> None:
    port = free_port()
    install(svc, "--http", f"127.0.0.1:{port}")
    d = assert_hardened(svc.unit)
    assert one(d, "Service.RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert one(d, "Service.ExecStart").endswith(f"apm-broker --http 127.0.0.1:{port}")
    assert_verifies_cleanly(svc.unit)


@needs_systemd_analyze
def test_systemd_analyze_here_does_report_an_unknown_directive(tmp_path: Path) -> None:
    """The control for the clean-verify tests: a misspelt key is reported on this systemd."""
    unit = tmp_path / service.UNIT_NAME
    text = service.render_unit(service.broker_executable())
    unit.write_text(text.replace("LockPersonality=yes", "LockPersonalty=yes"))
    r = verify(unit)
    assert "unknown key" in r.stderr.lower(), r.stderr


@pytest.mark.slow
def test_install_without_a_service_manager_starts_a_background_broker_and_says_so(
    svc: ServiceEnv,
) -> None:
    doc = install(svc)
    assert (doc["manager"], doc["enabled"], doc["files"]) == (
        "background-process",
        False,
        [str(svc.unit)],
    )
    pid = doc["pid"]
    assert isinstance(pid, int) and alive(pid)
    broker = doc["broker"]
    assert isinstance(broker, dict)
    assert (broker["pid"], broker["started_by"], broker["started_now"]) == (
        pid,
        "background process",
        True,
    )
    assert "broker.server.daemon" in str(broker["command"])  # which installation runs it
    status = svc.apm("status", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(svc.apm("broker", "status", "--json").stdout)
    assert (st["manager"], st["unit_installed"], st["broker_running"], st["pid"]) == (
        "background-process",
        True,
        True,
        pid,
    )
    # one story: the unit file exists, and nothing enables it here
    assert st["service_state"] == "unit written, not enabled (no service manager running here)"
    assert str(st["started_by"]).startswith("background process")
    human = svc.apm("broker", "install")
    assert human.returncode == 0, human.stderr
    assert f"wrote {svc.unit}" in human.stderr
    assert "the unit is written but NOT enabled" in human.stderr
    assert f"running broker: pid {pid}" in human.stderr and "already running" in human.stderr
    assert ["--user", "enable", "--now", service.UNIT_NAME] not in svc.calls()


@pytest.mark.slow
def test_broker_status_never_says_installed_and_not_installed_at_once(svc: ServiceEnv) -> None:
    st = json.loads(svc.apm("broker", "status", "--json").stdout)
    assert (st["unit_installed"], st["service_state"], st["broker_running"]) == (
        False,
        "no unit written",
        False,
    )
    assert st["started_by"] is None
    svc.unit.parent.mkdir(parents=True)
    svc.unit.write_text(service.render_unit())  # written by hand, or by an earlier install
    st = json.loads(svc.apm("broker", "status", "--json").stdout)
    assert st["unit_installed"] is True
    assert "not installed" not in st["service_state"] and "no unit" not in st["service_state"]
    assert st["service_state"].startswith("unit written, not enabled")


@pytest.mark.slow
def test_uninstall_removes_the_unit_and_stops_the_background_broker(svc: ServiceEnv) -> None:
    pid = install(svc)["pid"]
    assert isinstance(pid, int)
    r = svc.apm("broker", "uninstall", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == {"manager": "background-process", "removed": [str(svc.unit)]}
    assert not svc.unit.exists()
    assert wait_gone(pid), "the broker still runs after uninstall"
    assert svc.apm("status", "--json").returncode != 0
    st = json.loads(svc.apm("broker", "status", "--json").stdout)
    assert (st["unit_installed"], st["broker_running"]) == (False, False)


@pytest.mark.slow
def test_install_with_http_and_no_service_manager_serves_http(svc: ServiceEnv) -> None:
    port = free_port()
    assert install(svc, "--http", f"127.0.0.1:{port}")["manager"] == "background-process"
    with socket.create_connection(("127.0.0.1", port), 2):
        pass


@pytest.mark.slow
def test_install_with_systemd_reloads_enables_and_reports_systemd(home: Path) -> None:
    svc = ServiceEnv(home, mode="running").setup()
    try:
        port = free_port()
        doc = install(svc, "--http", f"127.0.0.1:{port}")
        assert doc["manager"] == "systemd"
        assert doc["files"] == [str(svc.unit)]
        calls = svc.calls()
        reload_at = calls.index(["--user", "daemon-reload"])
        enable_at = calls.index(["--user", "enable", "--now", service.UNIT_NAME])
        assert reload_at < enable_at
        # the broker the fake systemd started from the unit's ExecStart is the one reported
        assert doc["pid"] == svc.fake_broker_pid()
        st = json.loads(svc.apm("broker", "status", "--json").stdout)
        assert (st["manager"], st["service_state"], st["broker_running"]) == (
            "systemd",
            "active",
            True,
        )
        # the unit's ExecStart --http works: the broker's own listener answers (no vault yet,
        # so its lock gate: 503 VAULT_LOCKED, before any token is looked at)
        r = httpx2.post(f"http://127.0.0.1:{port}/mcp", timeout=20)
        assert (r.status_code, r.json()["code"]) == (503, "VAULT_LOCKED")

        r = svc.apm("broker", "uninstall", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"manager": "systemd", "removed": [str(svc.unit)]}
        calls = svc.calls()
        disable_at = calls.index(["--user", "disable", "--now", service.UNIT_NAME])
        assert ["--user", "daemon-reload"] in calls[disable_at:]
        assert not svc.unit.exists()
        pid = doc["pid"]
        assert isinstance(pid, int) and wait_gone(pid)
    finally:
        kill_quietly(svc.fake_broker_pid())


@pytest.mark.slow
def test_install_with_systemd_replaces_a_running_background_broker(home: Path) -> None:
    svc = ServiceEnv(home).setup()
    try:
        started = svc.apm("broker", "start", "--json")
        assert json.loads(started.stdout)["manager"] == "background-process"
        svc.mode = "running"
        doc = install(svc)
        assert doc["manager"] == "systemd"
        assert doc["pid"] == svc.fake_broker_pid()
    finally:
        svc.apm("broker", "stop")
        kill_quietly(svc.fake_broker_pid())


@pytest.mark.slow
def test_install_reports_a_failing_systemctl_enable_with_its_message(home: Path) -> None:
    svc = ServiceEnv(home, mode="enable-fails").setup()
    r = svc.apm("broker", "install", "--json")
    assert r.returncode == BrokerUnavailable.exit_code, r.stderr
    assert "systemctl --user enable --now apm-broker.service failed" in r.stderr
    assert "masked" in r.stderr
    assert r.stdout == ""
    assert svc.fake_broker_pid() is None
    assert svc.apm("status", "--json").returncode != 0  # and no fallback broker was started


# ---------------------------------------------------------------------------- sd_notify READY=1


def receive(sock: socket.socket, deadline: float) -> str:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    return sock.recv(4096).decode()


@pytest.mark.slow
@pytest.mark.parametrize("namespace", ["path", "abstract"])
def test_the_broker_notifies_ready_after_binding_and_stopping_on_sigterm(
    home: Path, namespace: str
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if namespace == "path":
            address = str(home / "notify.sock")
            sock.bind(address)
        else:
            address = f"@apm-test-notify-{os.getpid()}-{home.name}"
            sock.bind("\0" + address[1:])
        broker = Broker(home, extra_env={"NOTIFY_SOCKET": address}).start(wait=False)
        try:
            ready = receive(sock, time.monotonic() + DEADLINE)
            socket_existed = broker.socket.exists()
            fields = dict(line.split("=", 1) for line in ready.splitlines() if "=" in line)
            assert fields.get("READY") == "1", ready
            assert fields.get("MAINPID") == str(broker.pid), ready
            assert socket_existed, "READY=1 arrived before the broker's socket existed"
            # ready means ready: the first request is served without any retry
            assert Apm(home)("status", "--json").returncode == 0
            broker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            stopping = receive(sock, time.monotonic() + DEADLINE)
            assert "STOPPING=1" in stopping.splitlines(), stopping
        finally:
            code = broker.stop()
    assert code == 0
