"""Stand-ins for an agent's executable, for the binding tests with real processes: copies of
/bin/dash at chosen paths (a copy, not a symlink: /proc/<pid>/exe resolves symlinks), running the
real CLI as their child, so the broker sees them among the caller's ancestors. And the broker
those tests share, whose HOME (`~` in the agent profiles' executable paths) is a temp dir.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .conftest import (
    CAPTURED,
    PY,
    STDERRS,
    SWEEP_HITS,
    Apm,
    Broker,
    make_home,
    register_secret,
    sweep,
)

CLI = [PY, "-m", "broker.cli.main"]
SESSION_REFUSED = 5  # SESSION_REQUIRED's exit code
TOKEN_ANYWHERE_RE = re.compile(r"eps_[A-Za-z0-9_-]{40,}")


def record(stdout: str, stderr: str) -> None:
    """Hand a child's output to the suite's secret sweep (conftest), as `Apm` does."""
    CAPTURED.extend([stdout, stderr])
    STDERRS.append(stderr)
    for token in TOKEN_ANYWHERE_RE.findall(stdout):
        register_secret(token)


def dash_copy(path: Path) -> Path:
    """A real executable of our own at `path` (its /proc/<pid>/exe is exactly this path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("dash") or "/bin/dash", path)
    path.chmod(0o755)
    return path


def through(exe: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a child of `exe` (`; exit $?` keeps dash from exec-replacing itself)."""
    cmd = " ".join(shlex.quote(a) for a in [*CLI, *args]) + "; exit $?"
    proc = subprocess.run(
        [str(exe), "-c", cmd], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    record(proc.stdout, proc.stderr)
    return proc


@contextlib.contextmanager
def broker_with_user_home(openai_key: str) -> Iterator[tuple[Path, Path, Apm, Broker]]:
    """(home, user_home, apm, broker): a started, initialised broker whose HOME is `user_home`,
    its vault holding the api_key `openai`. On exit: stopped, swept for plaintext secrets
    (asserted: none) and removed."""
    home = make_home()
    user_home = home / "user"
    user_home.mkdir()
    broker = Broker(home, extra_env={"HOME": str(user_home)}).start()
    try:
        apm = Apm(home)
        apm.ok("init", "--profile", "interactive")
        apm.ok("add", "api_key", "openai", "--from-stdin", stdin=openai_key + "\n")
        yield home, user_home, apm, broker
    finally:
        broker.stop()
        hits = sweep(home)  # the suite's plaintext sweep, as for every function-scoped home
        SWEEP_HITS.extend(hits)
        STDERRS.clear()
        shutil.rmtree(home, ignore_errors=True)
    assert not hits, f"secrets found in plaintext: {hits[:5]}"
