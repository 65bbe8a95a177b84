"""Running code as another local uid, for the tests whose boundary is the uid: a client of
another user against our broker, a broker of an ordinary user, a process of the same uid.

We run as root (CI too): a test user is created with useradd when missing. Those tests must run
in CI: without root they fail there and are skipped elsewhere (`need_root`).

The other user may not enter a private directory (a venv under /root, a CI checkout under a
private temporary directory), so what it runs is an interpreter it may execute (`python_for`)
and code copied where it may read it (`public_dir`, `publish`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534  # uid and gid of user nobody
PLAIN_ENV = {"PATH": "/usr/bin:/bin"}  # the whole environment of what runs as the other user


def need_root(why: str = "needs root to create and run as other users") -> None:
    """Fail without root in CI (these tests must run there), skip elsewhere."""
    if os.getuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root: this test must run there ({why})")
        pytest.skip(why)


def ensure_user(name: str) -> pwd.struct_passwd:
    """A local system user `name`, created with useradd when missing (needs root)."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # 9: created meanwhile by a parallel test run
    assert proc.returncode in (0, 9), proc.stderr
    return pwd.getpwnam(name)


def as_user(user: pwd.struct_passwd | int, cwd: str | Path = "/") -> dict[str, Any]:
    """subprocess keyword arguments that run a child as `user` (a passwd entry, or a uid that is
    its own gid, like nobody's), with no supplementary groups, in `cwd`."""
    uid, gid = (user, user) if isinstance(user, int) else (user.pw_uid, user.pw_gid)
    return {"user": uid, "group": gid, "extra_groups": [], "cwd": cwd}


def python_for(
    user: pwd.struct_passwd | int, probe: str = "pass", cwd: str | Path = "/"
) -> str | None:
    """An interpreter of this Python's minor version that `user` may run and that runs the code
    `probe` there (isolated mode, PLAIN_ENV) without error, or None. The venv's own may sit in a
    directory the user cannot enter; the C extensions copied for it need the same 3.x."""
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [  # not the venv's own link: its site-packages would come with it
        os.path.realpath(sys.executable),
        shutil.which(minor, path="/usr/local/bin:/usr/bin:/bin:/opt/python/bin"),
    ]
    check = f"import sys\nassert sys.version_info[:2] == {tuple(sys.version_info[:2])}\n{probe}\n"
    for interp in dict.fromkeys(c for c in candidates if c):
        try:
            proc = subprocess.run(
                [interp, "-I", "-c", check],
                env=PLAIN_ENV,
                capture_output=True,
                timeout=60,
                check=False,
                **as_user(user, cwd),
            )
        except OSError:  # not there, or not the user's to run
            continue
        if proc.returncode == 0:
            return interp
    return None


@contextlib.contextmanager
def public_dir(prefix: str, mode: int = 0o755) -> Iterator[Path]:
    """A new directory under /tmp that other users may enter (by default), removed after."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        work.chmod(mode)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish(src: Path, dest: Path, symlinks: bool = False) -> Path:
    """Copy the file or tree `src` to `dest` (no __pycache__), readable by every user: dirs and
    executables 0755, other files 0644. Returns `dest`."""
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=symlinks, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return dest
