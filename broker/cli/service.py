"""Running the broker as a user service: systemd user unit, launchd agent, or a background process.

`apm broker install` writes the unit (or plist) with ExecStart pointing at this installation's
`apm-broker` and enables it with the service manager that is running; where none is, it starts
a detached background process instead. It always says which one it used.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from broker import paths

UNIT_NAME = "apm-broker.service"
AGENT_LABEL = "dev.apm.broker"
DEFAULT_EXEC = "%h/.local/bin/apm-broker"

_UNIT = """\
# apm-broker as a systemd user service. `apm broker install` writes this unit to
# ~/.config/systemd/user/ with ExecStart pointing at the installed apm-broker, then enables it.
[Unit]
Description=apm secret broker for AI agents

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
# systemd creates %t/apm (0700) on each start: under ProtectSystem=strict the broker could not
RuntimeDirectory=apm
RuntimeDirectoryMode=0700
Restart=on-failure
RestartSec=1
LimitCORE=0
UMask=0077
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ReadWritePaths={rw_paths}
LockPersonality=yes
RestrictAddressFamilies={families}
{environment}
[Install]
WantedBy=default.target
"""

DEFAULT_RW = "-%h/.local/share/apm -%h/.local/state/apm -%h/.config/apm"


def render_unit(
    exec_path: str = DEFAULT_EXEC,
    http: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    args = f" --http {http}" if http else ""
    rw = DEFAULT_RW
    env = env or {}
    if env.get("APM_HOME"):
        rw += f" -{env['APM_HOME']}"
    environment = "".join(f"Environment={k}={v}\n" for k, v in sorted(env.items()))
    return _UNIT.format(
        exec_start=f"{exec_path}{args}",
        rw_paths=rw,
        # AF_NETLINK: the HTTP listener asks the kernel (sock_diag) who owns each connection
        families="AF_UNIX AF_INET AF_INET6 AF_NETLINK" if http else "AF_UNIX",
        environment=environment,
    )


def render_plist(exec_path: str, home: Path, env: dict[str, str] | None = None) -> bytes:
    logs = home / "Library" / "Logs" / "apm"
    doc: dict[str, object] = {
        "Label": AGENT_LABEL,
        "ProgramArguments": [exec_path],
        "RunAtLoad": True,
        "KeepAlive": True,
        "ProcessType": "Interactive",
        "StandardOutPath": str(logs / "broker.out.log"),
        "StandardErrorPath": str(logs / "broker.err.log"),
        "Umask": 0o077,
        "SoftResourceLimits": {"Core": 0},
        "HardResourceLimits": {"Core": 0},
    }
    if env:
        doc["EnvironmentVariables"] = dict(env)
    return plistlib.dumps(doc)


def broker_executable() -> str:
    sibling = Path(sys.executable).parent / "apm-broker"
    if sibling.exists():
        return str(sibling)
    found = shutil.which("apm-broker")
    return str(Path(found).resolve()) if found else str(sibling)


def _env_for_service() -> dict[str, str]:
    return {
        k: os.environ[k]
        for k in ("APM_HOME", "APM_VAULT_PATH", "APM_BROKER_ADDR")
        if os.environ.get(k)
    }


@dataclass(frozen=True)
class Manager:
    name: str  # "systemd", "launchd" or "background-process"

    @staticmethod
    def detect() -> Manager:
        if sys.platform == "darwin" and shutil.which("launchctl"):
            return Manager("launchd")
        if shutil.which("systemctl"):
            r = subprocess.run(
                ["systemctl", "--user", "is-system-running"],
                capture_output=True,
                text=True,
                check=False,
            )
            if r.stdout.strip() in ("running", "degraded", "starting"):
                return Manager("systemd")
        return Manager("background-process")


def unit_path(home: Path | None = None) -> Path:
    home = home or Path.home()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return base / "systemd" / "user" / UNIT_NAME


def plist_path(home: Path | None = None) -> Path:
    return (home or Path.home()) / "Library" / "LaunchAgents" / f"{AGENT_LABEL}.plist"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _make_dirs(env: dict[str, str]) -> None:
    """ReadWritePaths= skips paths that do not exist: create apm's own directories first."""
    p = paths.resolve()
    for d in {p.vault.parent, p.state_dir, p.config_dir}:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_service_files(http: str | None = None, home: Path | None = None) -> list[Path]:
    """Write the systemd unit (Linux) or the launchd plist (macOS); returns what was written."""
    exe = broker_executable()
    env = _env_for_service()
    _make_dirs(env)
    if sys.platform == "darwin":
        path = plist_path(home)
        _write(path, render_plist(exe, home or Path.home(), env))
        return [path]
    path = unit_path(home)
    _write(path, render_unit(exe, http, env).encode())
    return [path]


def run(argv: list[str]) -> tuple[int, str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    return r.returncode, (r.stderr or r.stdout).strip()
