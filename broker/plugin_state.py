"""Which third-party plugins the owner enabled: `plugins.json` in apm's config directory.

Shared by the CLI (`apm plugin enable|disable`, importers) and the broker (the committed
`install_plugin` transaction); it imports nothing but the stdlib and `broker.paths`.

Rules:
- Written atomically with mode 0600; a missing or unreadable file means "none enabled".
- Built-ins are always on and never listed here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from broker import paths


def state_path() -> Path:
    return paths.resolve().config_dir / "plugins.json"


def read_enabled(path: Path | None = None) -> set[str]:
    try:
        doc = json.loads((path or state_path()).read_text())
    except (OSError, ValueError):
        return set()
    names = doc.get("enabled") if isinstance(doc, dict) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def write_enabled(names: set[str], path: Path | None = None) -> None:
    target = path or state_path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".plugins.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"enabled": sorted(names)}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
