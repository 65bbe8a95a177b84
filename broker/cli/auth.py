"""How a command proves itself to the broker: the session in APM_EPHEMERAL_ID, else the owner.

Rules:
- A session token comes only from the environment (never argv); the master password only from
  the terminal or --password-stdin.
- `--password-stdin` means the caller chose the owner path explicitly, even with a session set.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pydantic import SecretStr

from .prompt import Input

TOKEN_ENV = "APM_EPHEMERAL_ID"  # noqa: S105 - the variable name
AGENT_ENV = "APM_EPHEMERAL_AGENT"


class Credentials:
    def __init__(self, args: argparse.Namespace, *, owner_only: bool = False) -> None:
        self.input = Input(getattr(args, "password_stdin", False))
        token = os.environ.get(TOKEN_ENV, "").strip()
        self.token = (
            SecretStr(token) if token and not owner_only and not self.input.password_stdin else None
        )
        self._password: SecretStr | None = None

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
