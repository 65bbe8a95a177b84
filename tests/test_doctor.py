"""`apm doctor`: a healthy setup, and each broken state it must name, each with its fix.

One broker with an unlocked vault serves the module; every test gets its own HOME (client
configs, XDG_CONFIG_HOME) so their configs never meet. States that need a broker of their own
(down, never initialised, locked) start one per test.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import PASSWORD, PY, Apm, Broker, clean_env, make_home

pytestmark = pytest.mark.slow

UNIT = "apm-broker.service"

# A stand-in for `systemctl --user`: a running user manager whose unit is FAKE_UNIT_STATE.
FAKE_SYSTEMCTL = """\
#!{python}
import os, sys
args = sys.argv[1:]
if args == ["--user", "is-system-running"]:
    print("running")
    sys.exit(0)
if args == ["--user", "is-active", "{unit}"]:
    state = os.environ.get("FAKE_UNIT_STATE", "inactive")
    print(state)
    sys.exit(0 if state == "active" else 3)
sys.exit(0)
"""


@dataclass
class Served:
    home: Path  # APM_HOME of the shared broker
    apm: Apm
    broker: Broker


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    home = make_home()
    broker = Broker(home).start()
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        yield Served(home, apm, broker)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Desk:
    """A person's temporary HOME, running `apm` against some APM_HOME."""

    apm_home: Path
    home: Path
    extra: dict[str, str]

    @property
    def apm(self) -> Apm:
        return Apm(self.apm_home)

    def env(self, **extra: str) -> dict[str, str]:
        env = clean_env(self.apm_home, HOME=str(self.home))
        for var in ("XDG_CONFIG_HOME", "APPDATA"):
            env.pop(var, None)
        env.update(self.extra)
        env.update(extra)
        return env

    def run(self, *args: str, password: bool = False, **extra: str) -> Any:
        return self.apm(*args, password=PASSWORD if password else None, env=self.env(**extra))

    def doctor(self, *args: str, **extra: str) -> tuple[int, dict[str, dict[str, Any]], Any]:
        """(exit code, checks by name, whole document) of `apm doctor --json`."""
        proc = self.run("doctor", "--json", *args, **extra)
        assert proc.stdout, f"doctor printed nothing ({proc.returncode}): {proc.stderr}"
        doc = json.loads(proc.stdout)
        checks = {c["name"]: c for c in doc["checks"]}
        assert len(checks) == len(doc["checks"]), f"duplicate check names: {doc['checks']}"
        assert doc["ok"] == (proc.returncode == 0), doc
        return proc.returncode, checks, doc

    def delegate(self, *args: str) -> tuple[str, str]:
        proc = self.run("delegate", "--ttl", "1h", "--json", *args, password=True)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        return out["token"], out["accessor"]

    def install(self, client: str) -> dict[str, Any]:
        proc = self.run(
            "mcp", "install", "--client", client, "--no-agent-binding", "--json", password=True
        )
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    def session(self, accessor: str) -> dict[str, Any]:
        proc = self.run("session", "show", accessor, "--json", password=True)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    def denials(self, accessor: str) -> list[Any]:
        proc = self.run("session", "why", accessor, "--json", password=True)
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout)["denials"])


def new_desk(apm_home: Path, tmp_path: Path, **extra: str) -> Desk:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return Desk(apm_home, home, dict(extra))


@pytest.fixture
def desk(served: Served, tmp_path: Path) -> Desk:
    return new_desk(served.home, tmp_path)


def cursor_config(desk: Desk) -> Path:
    return desk.home / ".cursor" / "mcp.json"


# ---------------------------------------------------------------------------- healthy


def test_a_healthy_setup_passes_every_check_and_exits_zero(desk: Desk) -> None:
    desk.install("cursor")
    token, _ = desk.delegate()  # host-bound (the default), nothing more
    code, checks, doc = desk.doctor(APM_EPHEMERAL_ID=token)
    assert code == 0, doc
    assert doc["ok"] is True
    bad = {n: c for n, c in checks.items() if c["status"] not in ("ok", "skip")}
    assert not bad, bad
    for name in ("versions", "broker", "socket", "vault", "session", "client cursor"):
        assert checks[name]["status"] == "ok", checks[name]
    assert str(cursor_config(desk)) in checks["client cursor"]["detail"]


def test_the_human_output_marks_each_check_ok_and_ends_with_all_checks_passed(
    desk: Desk,
) -> None:
    desk.install("cursor")
    proc = desk.run("doctor", "--client", "cursor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("ok") and " broker: running" in ln for ln in lines), lines
    assert any(ln.startswith("ok") and " client cursor: " in ln for ln in lines), lines
    assert not any(ln.startswith("FAIL") for ln in lines), lines
    assert "fix:" not in proc.stdout
    assert lines[-1] == "all checks passed"


def test_versions_are_ok_when_cli_shim_and_broker_match(desk: Desk) -> None:
    from broker import __version__

    code, checks, _ = desk.doctor()
    v = checks["versions"]
    assert v["status"] == "ok", v
    assert f"cli {__version__}" in v["detail"]
    assert f"shim {__version__}" in v["detail"]
    assert f"broker {__version__}" in v["detail"]
    assert code == 0


# ----------------------------------------------------------------------------- broker


def test_a_broker_that_is_not_running_fails_with_apm_broker_start(tmp_path: Path) -> None:
    desk = new_desk(make_home(), tmp_path)
    try:
        code, checks, _ = desk.doctor()
        assert code != 0
        assert checks["broker"]["status"] == "fail"
        assert checks["broker"]["fix"] == "apm broker start"
        # the vault check still looks at the file, and names its fix
        assert checks["vault"]["status"] == "fail"
        assert checks["vault"]["fix"] == "apm init"

        proc = desk.run("doctor")
        assert proc.returncode != 0
        lines = proc.stdout.splitlines()
        i = next(i for i, ln in enumerate(lines) if ln.startswith("FAIL broker: "))
        assert lines[i + 1].strip() == "fix: apm broker start", lines
        assert lines[-1] == "some checks failed"
    finally:
        shutil.rmtree(desk.apm_home, ignore_errors=True)


def test_a_socket_directory_open_to_others_fails_with_a_chmod_fix(
    served: Served, desk: Desk
) -> None:
    run_dir = served.broker.socket.parent
    before = stat.S_IMODE(run_dir.stat().st_mode)
    assert before == 0o700
    run_dir.chmod(0o755)
    try:
        code, checks, _ = desk.doctor()
    finally:
        run_dir.chmod(before)
    sock = checks["socket"]
    assert sock["status"] == "fail", sock
    assert "0755" in sock["detail"]
    assert sock["fix"].startswith(f"chmod 700 {run_dir}")
    assert code != 0
    # and once restored, the same check passes again
    code, checks, _ = desk.doctor()
    assert checks["socket"]["status"] == "ok"
    assert code == 0


# ------------------------------------------------------------------------------ vault


def test_a_running_broker_without_a_vault_fails_with_apm_init(
    home: Path, broker: Broker, tmp_path: Path
) -> None:
    desk = new_desk(home, tmp_path)
    code, checks, _ = desk.doctor()
    assert checks["broker"]["status"] == "ok"
    assert checks["vault"]["status"] == "fail", checks["vault"]
    assert checks["vault"]["fix"] == "apm init"
    assert code != 0


def test_a_locked_vault_fails_with_apm_unlock(
    home: Path, vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    desk = new_desk(home, tmp_path)
    token, _ = desk.delegate()
    assert desk.doctor()[0] == 0
    apm.ok("lock", password=None)
    code, checks, _ = desk.doctor(APM_EPHEMERAL_ID=token)
    assert checks["vault"]["status"] == "fail", checks["vault"]
    assert "locked" in checks["vault"]["detail"]
    assert checks["vault"]["fix"] == "apm unlock"
    # the session cannot be checked while locked, and says what would let it be
    assert checks["session"]["status"] == "fail"
    assert checks["session"]["fix"] == "apm unlock"
    assert code != 0


# ---------------------------------------------------------------------------- session


def test_no_session_in_the_environment_is_skipped(desk: Desk) -> None:
    code, checks, _ = desk.doctor()
    assert checks["session"]["status"] == "skip"
    assert code == 0


def test_an_unknown_token_fails_and_suggests_apm_delegate(desk: Desk) -> None:
    code, checks, _ = desk.doctor(APM_EPHEMERAL_ID="eps_" + "Q" * 43)
    s = checks["session"]
    assert s["status"] == "fail", s
    assert "unknown token" in s["detail"]
    assert "apm delegate" in s["fix"]
    assert code != 0


def test_a_revoked_session_fails(desk: Desk) -> None:
    token, accessor = desk.delegate()
    assert desk.run("session", "revoke", accessor).returncode == 0
    code, checks, _ = desk.doctor(APM_EPHEMERAL_ID=token)
    s = checks["session"]
    assert s["status"] == "fail", s
    assert accessor in s["detail"] and "revoked" in s["detail"]
    assert f"apm session why {accessor}" in s["fix"]
    assert "apm delegate" in s["fix"]
    assert code != 0


def test_a_session_bound_to_another_process_fails_naming_the_pid_binding_without_a_denial(
    desk: Desk,
) -> None:
    sibling = subprocess.Popen(["sleep", "600"])
    try:
        token, accessor = desk.delegate("--pid", str(sibling.pid))
        before = desk.session(accessor)
        denials = desk.denials(accessor)
        code, checks, _ = desk.doctor(APM_EPHEMERAL_ID=token)
        after = desk.session(accessor)
        assert desk.denials(accessor) == denials
    finally:
        sibling.kill()
        sibling.wait()
    s = checks["session"]
    assert s["status"] == "fail", s
    assert "pid binding" in s["detail"]
    assert "apm delegate" in s["fix"]
    assert code != 0
    assert after["use_count"] == before["use_count"]
    assert after["state"] == "active"


def test_a_session_bound_to_this_process_tree_is_ok_and_not_consumed(desk: Desk) -> None:
    token, accessor = desk.delegate("--pid", str(os.getpid()), "--max-uses", "1")
    before = desk.session(accessor)
    for _ in range(2):  # twice: a single use allowed, so a counted check would exhaust it
        code, checks, _ = desk.doctor(APM_EPHEMERAL_ID=token)
        assert checks["session"]["status"] == "ok", checks["session"]
        assert accessor in checks["session"]["detail"]
        assert code == 0
    after = desk.session(accessor)
    assert after["use_count"] == before["use_count"] == 0
    assert after["state"] == "active"
    assert desk.denials(accessor) == []


# ---------------------------------------------------------------------- client config


def test_a_client_config_pointing_at_a_missing_command_fails_with_mcp_install(
    desk: Desk,
) -> None:
    desk.install("cursor")
    path = cursor_config(desk)
    doc = json.loads(path.read_text())
    doc["mcpServers"]["apm"]["command"] = str(desk.home / "gone" / "apm-mcp")
    path.write_text(json.dumps(doc))
    code, checks, _ = desk.doctor()
    c = checks["client cursor"]
    assert c["status"] == "fail", c
    assert "does not exist" in c["detail"]
    assert c["fix"] == "apm mcp install --client cursor"
    assert code != 0

    proc = desk.run("doctor")
    lines = proc.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("FAIL client cursor: "))
    assert lines[i + 1].strip() == "fix: apm mcp install --client cursor", lines
    assert proc.returncode != 0


def test_a_client_config_whose_session_was_revoked_fails_with_mcp_install(desk: Desk) -> None:
    out = desk.install("cursor")
    assert desk.run("session", "revoke", out["accessor"]).returncode == 0
    code, checks, _ = desk.doctor()
    c = checks["client cursor"]
    assert c["status"] == "fail", c
    assert "revoked" in c["detail"]
    assert c["fix"] == "apm mcp install --client cursor"
    assert code != 0


def test_a_required_client_that_is_not_installed_fails_with_mcp_install(desk: Desk) -> None:
    code, checks, _ = desk.doctor()
    assert checks["client windsurf"]["status"] == "skip"
    assert code == 0
    code, checks, _ = desk.doctor("--client", "windsurf")
    c = checks["client windsurf"]
    assert c["status"] == "fail", c
    assert c["fix"] == "apm mcp install --client windsurf"
    assert code != 0


def test_a_client_config_with_invalid_json_fails_without_crashing(desk: Desk) -> None:
    path = cursor_config(desk)
    path.parent.mkdir(parents=True)
    path.write_text('{"mcpServers": {"apm": ')
    code, checks, _ = desk.doctor()
    c = checks["client cursor"]
    assert c["status"] == "fail", c
    assert c["fix"].endswith("apm mcp install --client cursor")
    assert str(path) in c["fix"]
    assert code != 0
    # the checks after it still ran
    assert {"service", "debug log"} <= set(checks)


@pytest.mark.parametrize(
    "content",
    ['{"mcpServers": [1]}', '{"mcpServers": {"apm": {"command": "/usr/bin/true", "env": ["x"]}}}'],
    ids=["servers-a-list", "env-a-list"],
)
def test_a_client_config_of_the_wrong_shape_fails_without_crashing(
    desk: Desk, content: str
) -> None:
    path = cursor_config(desk)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    code, checks, _ = desk.doctor()
    c = checks["client cursor"]
    assert c["status"] == "fail", c
    assert c["fix"].endswith("apm mcp install --client cursor")
    assert code != 0
    assert {"service", "debug log"} <= set(checks)


def test_with_the_broker_down_the_session_check_says_apm_broker_start(tmp_path: Path) -> None:
    desk = new_desk(make_home(), tmp_path)
    try:
        code, checks, _ = desk.doctor(APM_EPHEMERAL_ID="eps_" + "Q" * 43)
        assert code != 0
        assert checks["session"]["fix"] == "apm broker start"
    finally:
        shutil.rmtree(desk.apm_home, ignore_errors=True)


# ---------------------------------------------------------------------------- service


def systemd_desk(apm_home: Path, tmp_path: Path, state: str) -> Desk:
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir(exist_ok=True)
    fake = fake_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL.format(python=PY, unit=UNIT))
    fake.chmod(0o755)
    desk = new_desk(apm_home, tmp_path)
    desk.extra.update(
        XDG_CONFIG_HOME=str(desk.home / ".config"),
        PATH=f"{fake_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        FAKE_UNIT_STATE=state,
    )
    return desk


def write_unit(desk: Desk) -> Path:
    unit = desk.home / ".config" / "systemd" / "user" / UNIT
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    return unit


def test_without_a_service_manager_the_service_check_is_skipped(desk: Desk) -> None:
    _, checks, _ = desk.doctor(PATH=str(desk.home))  # no systemctl anywhere
    assert checks["service"]["status"] == "skip", checks["service"]
    assert "background process" in checks["service"]["detail"]


def test_a_failed_systemd_unit_fails_with_systemctl_and_journalctl(
    served: Served, tmp_path: Path
) -> None:
    desk = systemd_desk(served.home, tmp_path, "failed")
    unit = write_unit(desk)
    code, checks, _ = desk.doctor()
    s = checks["service"]
    assert s["status"] == "fail", s
    assert str(unit) in s["detail"] and "failed" in s["detail"]
    assert f"systemctl --user restart {UNIT}" in s["fix"]
    assert f"journalctl --user -u {UNIT}" in s["fix"]
    assert code != 0


def test_an_active_systemd_unit_is_ok(served: Served, tmp_path: Path) -> None:
    desk = systemd_desk(served.home, tmp_path, "active")
    write_unit(desk)
    code, checks, _ = desk.doctor()
    assert checks["service"]["status"] == "ok", checks["service"]
    assert "active" in checks["service"]["detail"]
    assert code == 0


def test_a_systemd_user_manager_without_the_unit_warns_with_apm_broker_install(
    served: Served, tmp_path: Path
) -> None:
    desk = systemd_desk(served.home, tmp_path, "inactive")
    code, checks, _ = desk.doctor()
    s = checks["service"]
    assert s["status"] == "warn", s
    assert s["fix"] == "apm broker install"
    assert code == 0


# -------------------------------------------------------------------------- debug log


def test_a_debug_log_with_errors_warns_naming_the_last_problems(served: Served, desk: Desk) -> None:
    log = served.home / "config" / "mcp_logging.log"
    assert not log.exists()
    lines = [
        "2025-01-01 10:00:00,000 INFO pid=4242 started",
        "2025-01-01 10:00:01,000 WARNING pid=4242 first warning",
        "2025-01-01 10:00:02,000 ERROR pid=4242 old error",
        "2025-01-01 10:00:03,000 INFO pid=4242 fine",
        "2025-01-01 10:00:04,000 WARNING pid=4242 slow broker",
        "2025-01-01 10:00:05,000 ERROR pid=4242 broker unreachable",
        "2025-01-01 10:00:06,000 INFO pid=4242 stopped",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("\n".join(lines) + "\n")
    try:
        code, checks, _ = desk.doctor()
    finally:
        log.unlink()
    d = checks["debug log"]
    assert d["status"] == "warn", d
    assert str(log) in d["detail"]
    for last in ("old error", "slow broker", "broker unreachable"):
        assert last in d["detail"]
    assert "first warning" not in d["detail"]  # only the last three
    assert "INFO" not in d["detail"]
    assert code == 0  # a warning does not fail the run


def test_a_missing_debug_log_is_skipped(served: Served, desk: Desk) -> None:
    log = served.home / "config" / "mcp_logging.log"
    assert not log.exists()
    code, checks, _ = desk.doctor()
    assert checks["debug log"]["status"] == "skip"
    assert str(log) in checks["debug log"]["detail"]
    assert code == 0
