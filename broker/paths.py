"""Where apm keeps its files: vault, config, state, logs and the broker socket, per platform.

Stdlib only: the CLI, the shim and the broker all import it to agree on locations. Kept light
for the shim's cold start: no dataclasses (it imports inspect) and tempfile only on macOS.

`APM_HOME` roots everything in one directory (tests use it); otherwise each OS's convention.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple


class Paths(NamedTuple):
    vault: Path
    config_dir: Path
    state_dir: Path
    runtime_dir: Path
    broker_addr: str

    @property
    def socket_path(self) -> Path | None:
        if self.broker_addr.startswith("ipc://"):
            return Path(self.broker_addr[len("ipc://") :])
        return None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "broker.log"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def _default_runtime_dir() -> Path:
    if sys.platform == "darwin":
        import tempfile

        return Path(tempfile.gettempdir()) / "apm"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "apm"
    return Path(f"/tmp/apm-{os.getuid()}")  # noqa: S108 - verified 0700 and ours before use


def resolve(env: dict[str, str] | None = None) -> Paths:
    env = dict(os.environ) if env is None else env
    home = env.get("APM_HOME")
    if home:
        root = Path(home)
        config_dir, state_dir, data_dir = root / "config", root / "state", root
        runtime_dir = root / "run"
    elif sys.platform == "darwin":
        base = _home() / "Library" / "Application Support" / "apm"
        config_dir, state_dir, data_dir = base, base / "state", base
        runtime_dir = _default_runtime_dir()
    elif sys.platform == "win32":
        base = Path(env.get("APPDATA", str(_home()))) / "apm"
        config_dir, state_dir, data_dir = base, base / "state", base
        runtime_dir = base / "run"
    else:
        config_dir = Path(env.get("XDG_CONFIG_HOME") or _home() / ".config") / "apm"
        state_dir = Path(env.get("XDG_STATE_HOME") or _home() / ".local" / "state") / "apm"
        data_dir = Path(env.get("XDG_DATA_HOME") or _home() / ".local" / "share") / "apm"
        runtime_dir = _default_runtime_dir()
    vault = Path(env["APM_VAULT_PATH"]) if env.get("APM_VAULT_PATH") else data_dir / "vault.apm"
    addr = env.get("APM_BROKER_ADDR") or f"ipc://{runtime_dir / 'broker.sock'}"
    return Paths(
        vault=vault,
        config_dir=config_dir,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        broker_addr=addr,
    )
