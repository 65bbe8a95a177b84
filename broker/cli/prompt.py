"""Reading the master password and secret values: from the terminal without echo, or stdin.

Rules:
- Never from argv or the environment.
- `--password-stdin` reads the first line of stdin; `--from-stdin` reads the rest of it.
- Multi-line values (keys, notes) are read at the terminal until EOF (Ctrl-D), never one line:
  a key cut at its first line would be saved broken, and its other lines typed into the shell.
"""

from __future__ import annotations

import getpass
import os
import sys

from pydantic import SecretStr

from broker.wire.errors import Cancelled, InvalidParameters
from broker.wire.limits import VALUE_MAX

READ_CAP = 4 * VALUE_MAX  # read on past the limit (so nothing is left for the shell), keep no more


def strip_one_newline(data: str) -> str:
    if data.endswith("\r\n"):
        return data[:-2]
    if data.endswith("\n"):
        return data[:-1]
    return data


def checked_text(data: bytes, field: str, where: str) -> str:
    if len(data) > VALUE_MAX:
        raise InvalidParameters(
            f"the value for {field!r} is longer than {VALUE_MAX // 1024} KiB", data={"where": where}
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameters(
            f"the value for {field!r} from {where} is not UTF-8 text",
            hint="secrets are stored as text; base64-encode binary data first",
        ) from exc


def read_file_value(field: str, path: str) -> SecretStr:
    """A secret value from a file (--from-file); one trailing newline is dropped."""
    try:
        with open(path, "rb") as f:
            data = f.read(VALUE_MAX + 1)
    except OSError as exc:
        raise InvalidParameters(
            f"cannot read {path}: {exc.strerror}", hint="check the path given to --from-file"
        ) from exc
    value = strip_one_newline(checked_text(data, field, "the file"))
    if not value:
        raise InvalidParameters(f"no value for {field!r} in {path} (the file is empty)")
    return SecretStr(value)


class Input:
    """One command's view of stdin: password line first, then a secret value."""

    def __init__(self, password_stdin: bool = False) -> None:
        self.password_stdin = password_stdin
        self._password_consumed = False

    @staticmethod
    def has_tty() -> bool:
        try:
            fd = os.open("/dev/tty", os.O_RDWR)
        except OSError:
            return False
        os.close(fd)
        return True

    def _ask(self, label: str) -> str:
        if not self.has_tty():
            raise InvalidParameters(
                f"no terminal to ask for the {label}",
                hint="pass --password-stdin and pipe it in",
            )
        try:
            return getpass.getpass(f"{label[0].upper()}{label[1:]}: ")
        except (EOFError, KeyboardInterrupt) as exc:
            raise Cancelled() from exc

    def _stdin_line(self, label: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise InvalidParameters(f"expected the {label} on stdin, got end of input")
        return line[:-1] if line.endswith("\n") else line

    def password(self, label: str = "master password") -> SecretStr:
        value = self._stdin_line(label) if self.password_stdin else self._ask(label)
        if not value:
            raise InvalidParameters(f"the {label} must not be empty")
        return SecretStr(value)

    def new_password(self, label: str = "new master password") -> SecretStr:
        if self.password_stdin:
            return self.password(label)
        first = self._ask(label)
        if not first:
            raise InvalidParameters(f"the {label} must not be empty")
        if self._ask(f"repeat the {label}") != first:
            raise InvalidParameters("the two passwords do not match", hint="try again")
        return SecretStr(first)

    def secret_from_stdin(self, field: str) -> SecretStr:
        data = strip_one_newline(sys.stdin.read())
        if not data:
            raise InvalidParameters(f"no value for {field!r} on stdin")
        return SecretStr(data)

    def secret_prompt(self, field: str, required: bool) -> SecretStr | None:
        value = self._ask(f"{field}" + ("" if required else " (empty to skip)"))
        if not value:
            if required:
                raise InvalidParameters(f"{field} is required")
            return None
        return SecretStr(value)

    def secret_lines(self, field: str, required: bool) -> SecretStr | None:
        """A multi-line value typed or pasted at the terminal, without echo, until EOF (Ctrl-D)."""
        if not self.has_tty():
            raise InvalidParameters(
                f"no terminal to ask for {field!r}", hint="use --from-file PATH or --from-stdin"
            )
        skip = "; Ctrl-D alone to skip" if required is False else ""
        label = (
            f"{field[0].upper()}{field[1:]} (multi-line, hidden: paste or type it, then press "
            f"Ctrl-D on a new line{skip}):\n"
        )
        data = _read_tty_until_eof(label)
        value = strip_one_newline(checked_text(data, field, "the terminal"))
        lines = value.count("\n") + 1 if value else 0
        _tty_write(f"apm: read {lines} line{'s' if lines != 1 else ''} for {field}\n")
        if not value:
            if required:
                raise InvalidParameters(f"{field} is required")
            return None
        return SecretStr(value)


def _tty_write(text: str) -> None:
    try:
        fd = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_tty_until_eof(prompt: str) -> bytes:
    """Read the terminal in canonical mode with echo off until EOF; Ctrl-C cancels."""
    import termios

    fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    try:
        old = termios.tcgetattr(fd)
        quiet = list(old)
        quiet[3] = quiet[3] & ~termios.ECHO  # lflags: no echo; ICANON stays, so Ctrl-D is EOF
        chunks: list[bytes] = []
        size = 0
        termios.tcsetattr(fd, termios.TCSANOW, quiet)  # before the prompt: a fast paste
        try:
            os.write(fd, prompt.encode())  # that follows it must not be echoed
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if size < READ_CAP:
                    chunks.append(chunk)
                size += len(chunk)
        except KeyboardInterrupt as exc:
            raise Cancelled() from exc
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, old)
            os.write(fd, b"\n")
    finally:
        os.close(fd)
    if size > VALUE_MAX:
        raise InvalidParameters(f"the value is longer than {VALUE_MAX // 1024} KiB")
    return b"".join(chunks)
