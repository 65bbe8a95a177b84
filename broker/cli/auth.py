"""How a command proves itself to the broker: the session in APM_EPHEMERAL_ID, else the owner.

Rules:
- A session token comes only from the environment (never argv); the master password only from
  the terminal or --password-stdin.
- `--password-stdin` means the caller chose the owner path explicitly, even with a session set.
- No pydantic at import: the one-shot commands authenticate with a session and must start fast;
  the password prompt (and pydantic's SecretStr) is imported only when the owner is asked.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .prompt import Input

TOKEN_ENV = "APM_EPHEMERAL_ID"  # noqa: S105 - the variable name
AGENT_ENV = "APM_EPHEMERAL_AGENT"


class Token:
    """A session token kept out of reprs and logs (SecretStr's interface, without pydantic)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Token('**********')"

    __str__ = __repr__


def session_token(args: argparse.Namespace | None = None) -> Token | None:
    """The session this command acts with, unless it asked for the owner (--password-stdin)."""
    if args is not None and getattr(args, "password_stdin", False):
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    return Token(token) if token else None


class Credentials:
    def __init__(self, args: argparse.Namespace, *, owner_only: bool = False) -> None:
        self._password_stdin = bool(getattr(args, "password_stdin", False))
        self._input: Input | None = None
        self.token = None if owner_only else session_token(args)
        self._password: Any = None

    @property
    def input(self) -> Input:
        if self._input is None:
            from .prompt import Input

            self._input = Input(self._password_stdin)
        return self._input

    @property
    def uses_session(self) -> bool:
        return self.token is not None

    def creds(self) -> dict[str, Any]:
        if self.token is not None:
            return {"token": self.token, "agent": os.environ.get(AGENT_ENV) or None}
        if self._password is None:
            self._password = self.input.password()
        return {"password": self._password}

    def prime(self) -> None:
        """Read the password now (it comes first on stdin, before a --from-stdin value)."""
        self.creds()
