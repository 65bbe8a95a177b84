"""Editing a secret value in the person's $VISUAL / $EDITOR, through a temporary file that
never outlives the command.

Rules:
- The file is created empty, 0600, in a fresh 0700 directory, on a memory file system when there
  is one ($XDG_RUNTIME_DIR, else /dev/shm), so the value need not touch a disk at all.
- Afterwards the file is overwritten and the whole directory removed, with whatever the editor
  left beside it (swap, backup, auto-save files), on success, failure and Ctrl-C alike.
- vim and neovim are started with -n (no swap file) and -i NONE (no viminfo/shada history).
- SIGHUP (the terminal closed) and SIGTERM unwind through the clean-up too.
- What this cannot promise: a copy the editor itself keeps elsewhere (a plugin, an undo
  directory configured outside the file's directory), or the file after `kill -9` of apm.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from pydantic import SecretStr

from broker.wire.errors import Cancelled, InvalidParameters

from .prompt import checked_text, strip_one_newline

VIM_FAMILY = {"vi", "vim", "nvim", "gvim", "vim.basic", "vim.tiny"}


def _private_root() -> str | None:
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):  # noqa: S108 - tmpfs
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return None  # tempfile's default


def editor_argv() -> list[str]:
    command = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidParameters(
            "cannot parse $VISUAL/$EDITOR", hint="set EDITOR to a command, e.g. EDITOR=nano"
        ) from exc
    if not argv:
        raise InvalidParameters("$VISUAL/$EDITOR is empty", hint="set EDITOR, e.g. EDITOR=nano")
    if os.path.basename(argv[0]) in VIM_FAMILY:
        argv += ["-n", "-i", "NONE"]
    return argv


def _shred(directory: Path) -> None:
    """Overwrite every regular file under `directory` with zeros, then remove it all."""
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError:
            continue
    shutil.rmtree(directory, ignore_errors=True)


class _Hangup(Exception):
    """SIGHUP/SIGTERM while the editor runs: unwind so the directory is still removed."""


def _raise_hangup(signum: int, _frame: object) -> None:
    raise _Hangup(signum)


def edit_secret(field: str, required: bool = True) -> SecretStr | None:
    """Open the editor on an empty private file; its saved content is the value."""
    argv = editor_argv()
    directory = Path(tempfile.mkdtemp(prefix="apm-edit-", dir=_private_root()))  # 0700
    # a closed terminal (SIGHUP) or a polite kill (SIGTERM) must not skip the clean-up below
    previous = {s: signal.signal(s, _raise_hangup) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        path = directory / f"{field}.txt"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            rc = subprocess.run([*argv, str(path)], check=False).returncode
        except OSError as exc:
            raise InvalidParameters(
                f"cannot start the editor {argv[0]!r}: {exc.strerror}",
                hint="set VISUAL or EDITOR to an installed editor, or use --from-file PATH",
            ) from exc
        if rc != 0:
            raise Cancelled(f"the editor exited with status {rc}; nothing was saved")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Cancelled("the editor left no file; nothing was saved") from exc
    except (KeyboardInterrupt, _Hangup) as exc:
        raise Cancelled() from exc
    finally:
        _shred(directory)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    value = strip_one_newline(checked_text(data, field, "the editor"))
    if not value:
        if required:
            raise InvalidParameters(f"{field} is required", hint="nothing was saved in the editor")
        return None
    return SecretStr(value)
