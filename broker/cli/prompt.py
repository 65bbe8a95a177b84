"""Reading the master password and secret values: from the terminal without echo, or stdin.

Rules:
- Never from argv or the environment.
- `--password-stdin` reads the first line of stdin; `--from-stdin` reads the rest of it.
"""

from __future__ import annotations

import getpass
import os
import sys

from pydantic import SecretStr

from broker.wire.errors import Cancelled, InvalidParameters


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
        data = sys.stdin.read()
        if data.endswith("\r\n"):
            data = data[:-2]
        elif data.endswith("\n"):
            data = data[:-1]
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
