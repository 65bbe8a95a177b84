"""The operation table: every broker operation declared once, with its names, models, access
rule and handler. The wire dispatcher and the MCP tools both run operations through
`dispatch.invoke`, so a rule written here holds on every path.

Rules:
- An operation's access rule is data, not code scattered over call sites: the lock gate,
  scope, owner-only, grants, the approval policy (`mutating`) and the audit class all come
  from `Rule`.
- Every wire method in `protocol.METHODS` has exactly one operation (tests/test_wire.py).
- A new operation gets every rule by being declared with `@operation(name, RULE)`.
- A change only an MCP tool proposes (enabling a plugin, the sync endpoints) is still an
  operation, declared with `@tool_operation`: it has no wire method, so no raw frame reaches
  it, and its commit runs through the same gate as every other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from broker.core.requests import GrantKind
from broker.core.sessions import SessionRecord
from broker.wire.errors import PermissionDenied
from broker.wire.protocol import METHODS

AuditClass = Literal["none", "read", "change"]


@dataclass(frozen=True)
class Rule:
    """What an operation needs before its handler runs, and how it is recorded.

    `scope` set: the master password, or a session holding at least that scope.
    `owner_only`: the master password, verified now; a session is never enough.
    `grantable`: a session lacking `scope` may still pass with a per-entry grant.
    `grant_kind`: the kind of grant that lets it pass: "reveal" (the value reaches the
      caller, e.g. the model) or "use" (a reference resolved for `apm run`).
    `mutating`: changes the vault's entries or spaces; the approval policy applies
      (approval.py): for a session whose policy is `owner` or `client` a wire request becomes
      a pending transaction the person approves; from an MCP tool it is always previewed as a
      transaction first, whatever the policy.
    `audit`: "none" (recorded by its handler, or nothing worth recording), "read" (one record
      of the outcome), "change" (an attempt record first, then the outcome).
    `quiet`: a successful call is logged at debug level (frequent reads).
    """

    unlocked: bool = False  # the lock gate: refuse with VAULT_LOCKED first
    scope: str | None = None
    owner_only: bool = False
    grantable: bool = False
    grant_kind: GrantKind = "reveal"
    mutating: bool = False
    audit: AuditClass = "read"
    quiet: bool = False


# the presets every handler module uses (defined once)
PUBLIC = Rule(audit="none", quiet=True)
UNAUDITED = Rule(audit="none")
ANYONE_UNLOCKED = Rule(unlocked=True)
OWNER = Rule(unlocked=True, owner_only=True)
OWNER_CHANGE = Rule(unlocked=True, owner_only=True, audit="change")
READ = Rule(unlocked=True, scope="read")
LISTING = Rule(unlocked=True, scope="read", quiet=True)
SECRETS = Rule(unlocked=True, scope="secrets", grantable=True)
# resolving references for `apm run`: a `use` grant is enough
SECRETS_USE = Rule(unlocked=True, scope="secrets", grantable=True, grant_kind="use")
WRITE = Rule(unlocked=True, scope="write", mutating=True, audit="change")
ADMIN = Rule(unlocked=True, scope="admin")


def filtered_admin(rec: SessionRecord, needed: str) -> PermissionDenied | None:
    """Admin operations see the whole vault's audit log, sessions and transactions; a session
    limited to some entries never gets them (delegation refuses the pair; this refuses one
    stored by an older version)."""
    if needed != "admin" or rec.filter.empty:
        return None
    return PermissionDenied(
        "a session limited to some entries cannot use admin operations",
        hint="ask the owner for an admin session without an entry filter",
        data={"needed": needed, "scope": rec.scope},
    )


Handler = Callable[[Any, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Operation:
    name: str  # the wire method, noun.verb
    params: type[BaseModel]
    result: type[BaseModel]
    rule: Rule
    handler: Handler
    tools: tuple[str, ...] = ()  # the MCP tools that run it


OPERATIONS: dict[str, Operation] = {}

H = TypeVar("H", bound=Handler)


def operation(name: str, rule: Rule = UNAUDITED, tools: tuple[str, ...] = ()) -> Callable[[H], H]:
    """Declare `name` (a method of protocol.METHODS) with its rule; the decorated function is
    its handler."""
    params, result = METHODS[name]

    def register(fn: H) -> H:
        if name in OPERATIONS:
            raise RuntimeError(f"operation {name} declared twice")
        OPERATIONS[name] = Operation(name, params, result, rule, fn, tools)
        return fn

    return register


# operations with no wire method: reached only by committing an MCP tool's transaction
TOOL_OPERATIONS: dict[str, Operation] = {}


def tool_operation(
    name: str,
    params: type[BaseModel],
    result: type[BaseModel],
    rule: Rule,
    tools: tuple[str, ...],
) -> Callable[[H], H]:
    """Declare an operation that only `tools` propose; the decorated function is its handler."""
    if name in METHODS:
        raise RuntimeError(f"{name} is a wire method: declare it with @operation")

    def register(fn: H) -> H:
        if name in TOOL_OPERATIONS:
            raise RuntimeError(f"operation {name} declared twice")
        TOOL_OPERATIONS[name] = Operation(name, params, result, rule, fn, tools)
        return fn

    return register


def find(name: str) -> Operation | None:
    """The operation a transaction names: a wire method's, or one only a tool proposes."""
    return OPERATIONS.get(name) or TOOL_OPERATIONS.get(name)
