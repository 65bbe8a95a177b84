"""The operations only MCP tools reach (no wire method): an agent's own access requests and
transactions, and the admin views of the audit log, an entry's history and the KDF profile.

Each is declared with `@tool_operation`, so the gate (`dispatch.invoke`) checks its rule before
the handler runs, as for every wire method; the tool modules only name, describe and shape.

Rules:
- A session sees only its own requests and transactions.
- `request.details` never returns a secret value: the `apm://` reference and an `apm run`
  command line that injects the value into a child process.
- Nothing here imports the MCP SDK (tests/test_layers.py).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.core.requests import AccessRequest, GrantKind
from broker.core.sessions import scope_rank
from broker.wire.display import escape
from broker.wire.errors import InternalError, PermissionDenied, RequestClosed
from broker.wire.protocol import AccessRequestFields, Empty, ProfileInfo, TxInfo

from .approval_handlers import request_url
from .context import Context
from .dispatch import invoke
from .operations import OPERATIONS, Rule, tool_operation
from .page_offer import offer_page
from .request_handlers import open_request
from .tool_args import Args, FieldName, Space

# ------------------------------------------------------------------ admin views


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
    space: Space | None = None


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


class ProfilesOut(ProfileInfo):  # the wire's profile.show result, and the choices
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


# ------------------------------------------------------------------ access requests


class RequestAccessArgs(Args):
    entry: str = Field(min_length=1, max_length=200, description="entry id or name")
    space: Space | None = None
    field: FieldName | None = Field(default=None, description="one field only (default: the entry)")
    duration_minutes: int = Field(ge=1, description="how long the access is needed")
    justification: str = Field(
        min_length=10, max_length=1000, description="why, in words the person will read"
    )
    access: GrantKind = Field(
        default="use",
        description=(
            '"use" (default): run commands with the secret through apm run, never seeing it; '
            '"reveal": the value itself is returned to you by decrypt_entry/get_totp (ask only '
            "when you must read it; the person may grant use instead)"
        ),
    )


class RequestRef(Args):
    request_id: str = Field(max_length=64)


# the tool contract's names for two shared fields (published since 0.1.0)
_TOOL_NAMES = {"id": "request_id", "minutes": "duration_minutes"}


# An access request as the agent's tools show it: the shared fields (protocol.
# AccessRequestFields, under the tool contract's names) and the next step. (No docstring: it
# would become the published outputSchema's description.)
class RequestInfo(AccessRequestFields):
    model_config = ConfigDict(
        alias_generator=lambda name: _TOOL_NAMES.get(name, name),
        serialize_by_alias=True,  # structuredContent and outputSchema use the tool's names
        validate_by_name=True,
        validate_by_alias=True,
    )

    next_step: str


class AccessDetails(BaseModel):
    request_id: str
    reference: str
    env_name: str
    run_command: str
    expires_at: datetime | None
    access: GrantKind
    decrypt_entry_available: bool
    note: str


class MyRequestsOut(BaseModel):
    requests: list[RequestInfo]


def env_name(req: AccessRequest) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", f"{req.entry_name}_{req.field or 'secret'}").strip("_")
    return (base or "SECRET").upper()


def info(req: AccessRequest, now: datetime) -> RequestInfo:
    status = req.status(now)
    step = {
        "pending": "waiting for the person to decide on the approval page they were sent, or "
        f'with "apm request approve {req.id}"',
        "approved": "call get_access_details for how to use it without seeing it",
        "denied": "the person declined; do not ask again for the same reason",
        "expired": "the grant or request expired; ask again with request_access if still needed",
        "revoked": "the person revoked the access",
    }[status]
    return RequestInfo(**req.shown(now), next_step=step)


def _session(ctx: Context) -> str:
    if ctx.session is None:
        raise PermissionDenied("access requests belong to a session")
    return ctx.session.accessor


# read scope; the tool call is audited by its caller (opening a request records its own event)
READ_TOOL = Rule(scope="read", audit="none")


@tool_operation("request.open", RequestAccessArgs, RequestInfo, READ_TOOL, ("request_access",))
async def _request_access(ctx: Context, a: RequestAccessArgs) -> RequestInfo:
    req = await open_request(
        ctx, a.entry, a.space, a.field, a.duration_minutes, a.justification, a.access
    )
    await offer_page(
        ctx.mcp,
        request_url(ctx.state, req.id),
        f"An AI agent asks for access to {escape(req.entry_name)}. Open the apm approval page "
        "on this machine to decide.",
    )
    return info(req, ctx.state.clock())


@tool_operation("request.status", RequestRef, RequestInfo, READ_TOOL, ("get_request_status",))
async def _status(ctx: Context, a: RequestRef) -> RequestInfo:
    req = ctx.state.requests().get(a.request_id, _session(ctx))
    return info(req, ctx.state.clock())


@tool_operation("request.details", RequestRef, AccessDetails, READ_TOOL, ("get_access_details",))
async def _details(ctx: Context, a: RequestRef) -> AccessDetails:
    req = ctx.state.requests().get(a.request_id, _session(ctx))
    status = req.status(ctx.state.clock())
    if status != "approved":
        raise RequestClosed(
            f"request is {status}, not approved",
            hint="get_request_status shows the decision",
            data={"state": status},
        )
    name = env_name(req)
    rec = ctx.session
    on_grant = rec is not None and scope_rank(rec.scope) < scope_rank("secrets")
    reveal = req.access == "reveal" and on_grant
    return AccessDetails(
        request_id=req.id,
        reference=req.reference(),
        env_name=name,
        run_command=f"apm run --env {name}={req.reference()} -- <command that uses ${name}>",
        expires_at=req.expires_at,
        access=req.access,
        decrypt_entry_available=req.access == "reveal",  # a use grant never opens it
        note=(
            "Run the command with APM_EPHEMERAL_ID set to this session's token: the value goes "
            "into the child's environment and is masked in its output, so it never passes "
            "through you. "
            + (
                "decrypt_entry also works for this entry until the grant expires, but prefer "
                "apm run."
                if reveal
                else "This is a use grant: decrypt_entry and get_totp stay refused for this "
                "entry; work through apm run."
                if req.access == "use"
                else ""
            )
        ).strip(),
    )


@tool_operation("request.mine", Args, MyRequestsOut, READ_TOOL, ("list_my_requests",))
async def _mine(ctx: Context, a: Args) -> MyRequestsOut:
    now = ctx.state.clock()
    reqs = ctx.state.requests().listing(_session(ctx))
    return MyRequestsOut(requests=[info(r, now) for r in reqs])


# ------------------------------------------------------------------ this session's transactions


class TxStatusArgs(Args):
    tx_id: str = Field(max_length=64)


class TxListArgs(Args):
    status: str | None = None


class TxListOut(BaseModel):
    transactions: list[TxInfo]


# this session's own transactions; the tool call is audited by its caller
OWN_TX = Rule(scope="write", audit="none")
OWN_TX_ADMIN = Rule(scope="admin", audit="none")


@tool_operation("tx.status", TxStatusArgs, TxInfo, OWN_TX, ("tx_status",))
async def _tx_status(ctx: Context, a: TxStatusArgs) -> TxInfo:
    accessor = ctx.session.accessor if ctx.session is not None else None
    tx = ctx.state.txs.get(a.tx_id, accessor)
    return tx.info(ctx.state.clock())


@tool_operation("tx.mine", TxListArgs, TxListOut, OWN_TX_ADMIN, ("tx_list",))
async def _tx_list(ctx: Context, a: TxListArgs) -> TxListOut:
    accessor = ctx.session.accessor if ctx.session is not None else None
    now = ctx.state.clock()
    txs = ctx.state.txs.listing(accessor, {a.status} if a.status else None)
    return TxListOut(transactions=[t.info(now) for t in txs])


@tool_operation("tx.abort", TxStatusArgs, TxInfo, OWN_TX_ADMIN, ("tx_abort",))
async def _tx_abort(ctx: Context, a: TxStatusArgs) -> TxInfo:
    if ctx.session is None:
        raise PermissionDenied("tx_abort needs a session")
    tx = ctx.state.txs.abort(a.tx_id, ctx.session.accessor)
    ctx.state.record("tx.aborted", ctx, tx=tx.tx_id)
    await ctx.state.save_tx(tx)
    return tx.info(ctx.state.clock())
