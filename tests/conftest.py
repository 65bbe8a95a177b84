"""Shared fixtures: a real broker process on a temporary APM_HOME, and the real `apm` CLI.

Secret hygiene sweep: every value a test feeds the CLI on stdin is a master password or a
secret (apm never accepts them in argv), and every `eps_` token the CLI prints is a token. All
of them are registered in `SECRETS`. When a test's APM_HOME is torn down, every file under it
(vault and backup, logs, audit log, debug log, broker output) and every stderr the CLI wrote
is scanned for each of them, raw, hex and base64; a hit fails that test, and
tests/test_zz_hygiene_sweep.py asserts the whole run's count is zero.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

PASSWORD = "correct horse battery staple"
PY = sys.executable
CAPTURED: list[str] = []
STDERRS: list[str] = []
HOMES: list[Path] = []
SECRETS: set[str] = set()
SWEEP_HITS: list[str] = []
_TOKEN_RE = re.compile(r"eps_[A-Za-z0-9_-]{40,}")


# Seconds each slow file took in one CI run (`-n 2 --dist loadfile`, junit times summed per
# file, 2026-12-04, a loaded machine). xdist hands whole files to its workers; its own order
# (most tests first) left the long files with few tests (test_crash, test_load_faults,
# test_fuzz, test_secret_hygiene) for last, where one worker could run them alone while the
# other idled. The run goes longest first instead; files not listed follow in their usual
# order. A stale figure costs only balance, never coverage.
FILE_SECONDS = {
    "test_writes_e2e.py": 134,
    "test_sync_e2e.py": 132,
    "test_rollback.py": 116,
    "test_load_faults.py": 112,
    "test_mcp_install.py": 103,
    "test_real_clients.py": 102,
    "test_cli_commands.py": 100,
    "test_http.py": 95,
    "test_fuzz.py": 94,
    "test_gate_e2e.py": 83,
    "test_broker_process.py": 80,
    "test_import.py": 77,
    "test_tx_persist_e2e.py": 76,
    "test_doctor.py": 74,
    "test_crash.py": 67,
    "test_sessions_e2e.py": 64,
    "test_credential_helpers.py": 59,
    "test_cli_multiline.py": 54,
    "test_secret_hygiene.py": 51,
    "test_cli_oneshot.py": 48,
    "test_service.py": 46,
    "test_mcp_tool_names.py": 46,
    "test_http_limits.py": 43,
    "test_plugins.py": 42,
    "test_vault_storage_cli.py": 41,
    "test_cli_polish.py": 40,
    "test_hygiene_planted.py": 39,
    "test_agent_profiles.py": 35,
    "test_sync.py": 34,
    "test_tx_race_e2e.py": 33,
    "test_attacks_e2e.py": 32,
    "test_plugin_types.py": 30,
    "test_cli_roundtrip.py": 29,
}
LAST = "test_zz_hygiene_sweep.py"  # its summary counts what the tests before it found


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (a stable sort: each file's tests stay together, in order)."""
    items.sort(key=lambda item: (item.path.name == LAST, -FILE_SECONDS.get(item.path.name, 0)))


def register_secret(value: str) -> None:
    value = value.strip()
    if len(value) >= 6:  # shorter ones would match by chance
        SECRETS.add(value)


def _forms(secret: str) -> list[bytes]:
    raw = secret.encode()
    out = [raw, raw.hex().encode()]
    for shift in range(3):  # base64 of the value at any alignment inside a larger blob
        chunk = base64.b64encode(b"\0" * shift + raw)[4 if shift else 0 : -4]
        if len(chunk) >= 8:
            out.append(chunk)
    return out


def sweep(home: Path) -> list[str]:
    """Every registered secret found in plaintext under `home` or in a CLI's stderr."""
    hits: list[str] = []
    needles = [(s, f) for s in sorted(SECRETS) for f in _forms(s)]
    for path in sorted(home.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        hits += [f"{path.relative_to(home)}: {s[:4]}…" for s, f in needles if f in data]
    for text in STDERRS:
        data = text.encode()
        hits += [f"stderr: {s[:4]}…" for s, f in needles if f in data]
    return hits


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env["APM_HOME"] = str(home)
    env.update(extra)
    return env


@dataclass
class Apm:
    """Runs the real `apm` CLI as a subprocess against one APM_HOME."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def __call__(
        self,
        *args: str,
        stdin: str | None = None,
        password: str | None = None,
        check: bool = False,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [PY, "-m", "broker.cli.main", *args]
        data = stdin
        if password is not None:
            argv.append("--password-stdin")
            data = password + "\n" + (stdin or "")
        proc = subprocess.run(
            argv,
            input=data if data is not None else "",
            capture_output=True,
            text=True,
            env=env or clean_env(self.home, **self.env),
            timeout=timeout,
            check=False,
        )
        CAPTURED.append(proc.stdout)
        CAPTURED.append(proc.stderr)
        STDERRS.append(proc.stderr)
        for line in (data or "").splitlines():
            register_secret(line)
        if data and "--from-stdin" in args:
            register_secret(data.split("\n", 1)[1] if password is not None else data)
        for token in _TOKEN_RE.findall(proc.stdout):
            register_secret(token)
        if check and proc.returncode != 0:
            raise AssertionError(f"apm {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def ok(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        kw.setdefault("password", PASSWORD)
        return self(*args, check=True, **kw)  # type: ignore[arg-type]


@dataclass
class Broker:
    """A real apm-broker process."""

    home: Path
    proc: subprocess.Popen[str] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def stdout_path(self) -> Path:
        return self.home / "broker-stdout.log"

    def output(self) -> str:
        return self.stdout_path.read_text() if self.stdout_path.exists() else ""

    @property
    def socket(self) -> Path:
        return self.home / "run" / "broker.sock"

    def argv(self) -> list[str]:
        """The broker's command line (subclasses start it otherwise)."""
        return [PY, "-m", "broker.server.daemon", "--log-level", "debug"]

    def popen_kw(self) -> dict[str, Any]:
        """More subprocess.Popen keyword arguments for the broker process (none here)."""
        return {}

    def start(self, wait: bool = True) -> Broker:
        # stdout to a file, not a pipe: a pipe nobody reads would block a chatty broker
        with open(self.stdout_path, "a") as out:
            self.proc = subprocess.Popen(
                self.argv(),
                env=clean_env(self.home, **self.extra_env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                **self.popen_kw(),
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until this broker process (or the daemon it runs as a child) answers `broker.ping`
        on its socket; it must not exit meanwhile. Pinged from this process: a CLI run per
        poll cost ~0.4 CPU-s and competed with the starting broker for the CPU."""
        from broker.cli.client import BrokerClient
        from broker.wire.errors import ApmError

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.output()
                raise AssertionError(f"broker exited early ({self.proc.returncode}): {out}")
            if self.socket.exists():
                with contextlib.suppress(ApmError), BrokerClient(f"ipc://{self.socket}") as c:
                    if c.call_raw("broker.ping", {}, timeout=2).get("pid") in self._pids():
                        return
            time.sleep(0.02)
        raise AssertionError("broker did not become ready")

    def _pids(self) -> set[int]:
        """This broker's process and its descendants (`apm broker run` may fork the daemon)."""
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.proc.pid)
            return {self.proc.pid, *(p.pid for p in proc.children(recursive=True))}
        return {self.proc.pid}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


def end_child(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """End a child that stops at the end of its stdin: close its stdin, wait for it (killed
    after `timeout`), close its stdout."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def make_home() -> Path:
    # Short paths: an ipc:// socket path must fit in sun_path (108 bytes).
    home = Path(tempfile.mkdtemp(prefix="apmt-", dir="/tmp"))
    HOMES.append(home)
    return home


@pytest.fixture
def home() -> Iterator[Path]:
    path = make_home()
    yield path
    try:
        hits = sweep(path)
        SWEEP_HITS.extend(hits)
        assert not hits, f"secrets found in plaintext: {hits[:5]}"
    finally:
        STDERRS.clear()
        reap_brokers(path)
        shutil.rmtree(path, ignore_errors=True)


def reap_brokers(home: Path) -> None:
    """Stop brokers a test's CLI started in the background (apm init/unlock auto-start)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if "broker.server.daemon" in cmd and proc.environ().get("APM_HOME") == str(home):
                proc.terminate()
                proc.wait(timeout=10)
        except (psutil.Error, subprocess.TimeoutExpired):
            continue


@pytest.fixture
def apm(home: Path) -> Apm:
    return Apm(home)


@pytest.fixture
def broker(home: Path) -> Iterator[Broker]:
    b = Broker(home).start()
    yield b
    b.stop()


@pytest.fixture
def vault(broker: Broker, apm: Apm) -> Broker:
    """A running broker with a fresh, unlocked vault (fast KDF profile).

    Set up over the wire from this process, as `apm init` does after its status check: a CLI
    run costs ~0.4 CPU-s, and `apm init` itself is tested where it is the subject
    (test_cli_roundtrip, test_cli_commands, test_broker_process, ...)."""
    from pydantic import SecretStr

    from broker.cli.client import BrokerClient
    from broker.wire.protocol import InitParams

    register_secret(PASSWORD)
    with BrokerClient(f"ipc://{broker.socket}") as client:
        client.call("vault.init", InitParams(profile="interactive"), password=SecretStr(PASSWORD))
    return broker
