"""What one operation runs with: the broker state, the peer, the credentials it came with,
and — once the gate has decided — its session and whether grants are needed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from broker.core.crypto import normalize_password
from broker.core.requests import GrantKind
from broker.core.sessions import SessionRecord
from broker.core.vault import StoredEntry
from broker.wire.errors import PermissionDenied, SessionRequired
from broker.wire.protocol import Auth

from .peer import Peer
from .state import State


def totp_seed_field(entry: StoredEntry) -> str | None:
    """The field holding an entry's TOTP seed (as `Vault.totp` reads it), if it has one."""
    if entry.type == "totp":
        return "secret"
    return "totp" if "totp" in entry.fields else None


@dataclass
class Context:
    state: State
    peer: Peer
    auth: Auth | None
    request_id: str
    session: SessionRecord | None = None
    identity: bytes = b""
    owner_proven: bool = False
    mcp: Any = None  # the MCP request context, for elicitation (tool calls only)
    grant_needed: bool = False  # the session lacks `secrets`: each entry needs a live grant
    grant_kind: GrantKind = "reveal"  # set by the gate from the operation's rule
    exe: str | None = None  # the peer's executable, when already known (MCP connections)
    via: str = "wire"  # "wire": invoke records the request; "mcp": the tool call is recorded
    # the approval page's proof of presence (a passkey assertion for this decision), checked
    # by the gate in place of the master password; set only in-process by the page, never
    # from a wire frame
    presence: Callable[[], Awaitable[None]] | None = None

    def check_grant(self, entry: StoredEntry, field: str, *, codes: bool = False) -> None:
        """The one grant check: for a session reading a secret on a grant, refuse unless a
        live grant of the kind the operation needs covers this field.

        A TOTP seed is opened only by a grant whose request named the seed field (the person
        saw that); any grant on the entry gives its codes (`codes`). A `use` grant resolves
        references (`apm run`) only: nothing that returns the value to the caller."""
        if not self.grant_needed or self.session is None:
            return
        seed = field == totp_seed_field(entry) and not codes
        grant = self.state.requests().grant(self.session.accessor, entry.id, field, named_only=seed)
        if grant is None and seed:
            raise PermissionDenied(
                "a grant on a TOTP entry gives its codes; the seed needs a request that names "
                f"the {field!r} field",
                hint=f'use get_totp for codes, or request_access with field "{field}"',
                data={"needed": "secrets", "scope": self.session.scope, "field": field},
            )
        if grant is None:
            raise PermissionDenied(
                f"this session has scope {self.session.scope!r} and no live grant for this "
                "entry's field",
                hint="ask for it with request_access; the person approves with "
                '"apm request approve REQ"',
                data={"needed": "secrets", "scope": self.session.scope},
            )
        if self.grant_kind == "reveal" and grant.access != "reveal":
            raise PermissionDenied(
                "this session's grant for the entry is a use grant: the value may be used "
                "through apm run but never returned to the session",
                hint="call get_access_details and run the command it gives; the value goes "
                "into the command's environment without passing through you",
                data={"needed": "reveal", "grant": "use", "request": grant.id},
            )

    @property
    def naming(self) -> str:
        """The MCP tool naming this caller sees (its session's, else the broker's)."""
        return self.state.tool_naming(self.session)

    def allows(self, space: str, tags: list[str], name: str) -> bool:
        f = self.session.filter if self.session is not None else None
        return f is None or f.empty or f.allows(space, tags, name)

    def visible(self, entry: StoredEntry) -> bool:
        """Entries outside the session's filter behave as not found."""
        return self.allows(entry.space, entry.tags, entry.name)

    def require_unfiltered(self) -> None:
        if self.session is not None and not self.session.filter.empty:
            raise PermissionDenied(
                "this session is limited to some entries and cannot change spaces",
                hint="ask the owner for a session without an entry filter",
            )

    def password(self) -> bytearray:
        if self.auth is None or self.auth.password is None:
            raise SessionRequired(
                "the master password is required", hint="run the command from a terminal"
            )
        return normalize_password(self.auth.password.get_secret_value())
