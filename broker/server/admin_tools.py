"""Admin-scope tools: the audit log, an entry's history, the vault's KDF profile.

Each is an operation without a wire method (`@tool_operation`): the gate checks its rule
(admin scope, no entry filter) before the handler runs, as for every wire method.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.wire.errors import InternalError, PermissionDenied
from broker.wire.protocol import Empty

from . import handlers  # noqa: F401 - declares the operations these tools run
from .context import Context
from .dispatch import invoke
from .operations import OPERATIONS, Rule, tool_operation
from .tool_base import Args, ToolSpec


class AuditArgs(Args):
    since: datetime | None = None
    event: str | None = Field(default=None, max_length=64)
    session: str | None = Field(default=None, max_length=64)
    entry: str | None = Field(default=None, max_length=200, description="entry id or name")
    after_seq: int = Field(default=0, ge=0, description="page: records after this seq")
    limit: int = Field(default=100, ge=1, le=1000)


class AuditOut(BaseModel):
    records: list[dict[str, Any]]
    next_after_seq: int | None


class HistoryArgs(Args):
    entry: str = Field(min_length=1, max_length=200)
    space: str | None = None


class FieldVersion(BaseModel):
    field: str
    value: str  # always masked
    replaced_at: datetime | None


class HistoryOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    updated_at: datetime
    secret_versions: list[FieldVersion]
    events: list[dict[str, Any]]


class ProfilesArgs(Args):
    action: Literal["show", "set"] = "show"
    profile: str | None = None


class ProfilesOut(BaseModel):
    profile: str
    memory_kib: int
    time_cost: int
    parallelism: int
    available: list[str]


def _matches(rec: dict[str, Any], a: AuditArgs, entry_ids: set[str]) -> bool:
    if a.event and rec.get("event") != a.event:
        return False
    if a.session and rec.get("session") != a.session:
        return False
    if entry_ids and not ({rec.get("entry"), rec.get("entry_id"), rec.get("name")} & entry_ids):
        return False
    if a.since is not None:
        try:
            return datetime.fromisoformat(str(rec.get("ts"))) >= a.since
        except ValueError:
            return False
    return True


# admin scope (a session limited to some entries never gets them); the tool call is audited
# by its caller
ADMIN_TOOL = Rule(scope="admin", audit="none")


@tool_operation("audit.search", AuditArgs, AuditOut, ADMIN_TOOL, ("get_audit_logs",))
async def _audit(ctx: Context, a: AuditArgs) -> AuditOut:
    audit = ctx.state.audit
    if audit is None:
        raise InternalError("the audit log is not open")
    ids: set[str] = set()
    if a.entry:
        e = ctx.state.cache.get().resolve(a.entry, None, ctx.visible)
        ids = {e.id, e.name}
    out: list[dict[str, Any]] = []
    more = False
    for rec in audit.records():
        seq = rec.get("seq")
        if not isinstance(seq, int) or seq <= a.after_seq or not _matches(rec, a, ids):
            continue
        if len(out) == a.limit:
            more = True
            break
        out.append({k: v for k, v in rec.items() if k not in ("prev", "mac")})
    return AuditOut(records=out, next_after_seq=out[-1]["seq"] if more and out else None)


@tool_operation("entry.versions", HistoryArgs, HistoryOut, ADMIN_TOOL, ("get_history",))
async def _history(ctx: Context, a: HistoryArgs) -> HistoryOut:
    entry = ctx.state.cache.get().resolve(a.entry, a.space, ctx.visible)
    versions: list[FieldVersion] = []
    for name, f in entry.fields.items():
        if f.secret:
            versions.append(FieldVersion(field=name, value="********", replaced_at=None))
            versions += [
                FieldVersion(field=name, value="********", replaced_at=h.replaced_at)
                for h in f.history
            ]
    events = await _audit(ctx, AuditArgs(entry=entry.id, limit=200))
    return HistoryOut(
        id=entry.id,
        name=entry.name,
        created_at=entry.created_at,
        updated_at=entry.updated_at,
        secret_versions=versions,
        events=events.records,
    )


@tool_operation("profile.manage", ProfilesArgs, ProfilesOut, ADMIN_TOOL, ("manage_profiles",))
async def _profiles(ctx: Context, a: ProfilesArgs) -> ProfilesOut:
    if a.action == "set":
        raise PermissionDenied(
            "changing the key-derivation profile is an owner operation",
            hint='the person runs "apm profile set PROFILE" in a terminal',
        )
    info = await invoke(ctx, OPERATIONS["profile.show"], Empty())
    return ProfilesOut(**info.model_dump(), available=["interactive", "standard", "hardened"])


ADMIN_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="get_audit_logs",
        title="Read the audit log",
        description=(
            "Records of the tamper-evident audit log (never secret values), filtered by time, "
            "event, session or entry, paged with after_seq/limit."
        ),
        scope="admin",
        args=AuditArgs,
        out=AuditOut,
        op="audit.search",
    ),
    ToolSpec(
        name="get_history",
        title="An entry's history",
        description="An entry's secret versions (values masked) and the audit events about it.",
        scope="admin",
        args=HistoryArgs,
        out=HistoryOut,
        op="entry.versions",
    ),
    ToolSpec(
        name="manage_profiles",
        title="The vault's key-derivation profile",
        description=(
            "Show the vault's Argon2id profile. Changing it is an owner operation done with "
            "`apm profile set` in a terminal."
        ),
        scope="admin",
        args=ProfilesArgs,
        out=ProfilesOut,
        op="profile.manage",
    ),
)
