"""The shape every MCP tool shares: validated arguments, a spec with scope and annotations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import mcp.types as types
from pydantic import BaseModel

from broker.core.sessions import SessionRecord, scope_rank
from broker.wire.errors import PermissionDenied, SessionRequired

from .context import Context
from .operations import filtered_admin
from .tool_args import Args

__all__ = ["Args", "Run", "ToolSpec", "require_scope", "require_session"]

Run = Callable[[Context, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    scope: str
    args: type[Args]
    out: type[BaseModel]
    # either the operation the tool runs (its rule, checked by the gate, decides who may; the
    # tool validates its arguments as the operation's params and shapes nothing else) ...
    op: str | None = None
    # ... or, for a tool not yet declared as one operation, its own runner
    run: Run | None = None
    read_only: bool = True
    destructive: bool = False
    idempotent: bool = True
    grantable: bool = False  # a session without `scope` may use it on entries it holds a grant for

    def to_mcp(self) -> types.Tool:
        return types.Tool(
            name=self.name,
            title=self.title,
            description=self.description,
            input_schema=self.args.model_json_schema(),
            output_schema=self.out.model_json_schema(),
            annotations=types.ToolAnnotations(
                title=self.title,
                read_only_hint=self.read_only,
                destructive_hint=self.destructive,
                idempotent_hint=self.idempotent,
                open_world_hint=False,
            ),
        )


def require_session(ctx: Context, what: str) -> SessionRecord:
    """A tool runs for a session only: no session is never the owner (fail closed)."""
    if ctx.session is None:
        raise SessionRequired(
            f"{what} needs a session", hint='ask the person to run "apm delegate"'
        )
    return ctx.session


def require_scope(ctx: Context, scope: str, what: str) -> None:
    """For a tool with its own runner: the session's scope, checked here (fail closed)."""
    rec = require_session(ctx, what)
    have = rec.scope
    refused = filtered_admin(rec, scope)
    if refused is not None:
        raise refused
    if scope_rank(have) < scope_rank(scope):
        raise PermissionDenied(
            f"{what} needs the {scope!r} scope; this session has {have!r}",
            hint=f'ask the person to run "apm delegate --scope {scope}" and restart the client '
            f"with the new APM_EPHEMERAL_ID",
            data={"needed": scope, "scope": have},
        )
