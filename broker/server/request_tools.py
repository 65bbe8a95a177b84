"""Just-in-time access tools (scope `read`): ask for one entry, follow the decision, and learn
how to use the credential without seeing it.

Rules:
- `get_access_details` never returns a secret value: it returns the `apm://` reference and a
  ready `apm run` command line that injects the value into a child process.
- A session sees only its own requests.
- Each tool runs one operation without a wire method (`@tool_operation`): the gate checks its
  rule (read scope) before the handler runs.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, Field

from broker.core.requests import AccessRequest, GrantKind
from broker.core.sessions import scope_rank
from broker.wire.display import escape
from broker.wire.errors import PermissionDenied, RequestClosed

from .context import Context
from .operations import Rule, tool_operation
from .tool_base import Args, ToolSpec


class RequestAccessArgs(Args):
    entry: str = Field(min_length=1, max_length=200, description="entry id or name")
    space: str | None = None
    field: str | None = Field(default=None, description="one field only (default: the entry)")
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


class RequestInfo(BaseModel):
    request_id: str
    state: str
    entry: str
    entry_id: str
    space: str
    field: str | None
    duration_minutes: int
    justification: str
    access: GrantKind
    created_at: datetime
    decided_at: datetime | None
    expires_at: datetime | None
    reason: str | None
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
    return RequestInfo(
        request_id=req.id,
        state=status,
        entry=req.entry_name,
        entry_id=req.entry_id,
        space=req.space,
        field=req.field,
        duration_minutes=req.minutes,
        justification=req.justification,
        access=req.access,
        created_at=req.created_at,
        decided_at=req.decided_at,
        expires_at=req.expires_at,
        reason=req.reason,
        next_step=step,
    )


def _session(ctx: Context) -> str:
    if ctx.session is None:
        raise PermissionDenied("access requests belong to a session")
    return ctx.session.accessor


# read scope; the tool call is audited by its caller (opening a request records its own event)
READ_TOOL = Rule(scope="read", audit="none")


@tool_operation("request.open", RequestAccessArgs, RequestInfo, READ_TOOL, ("request_access",))
async def _request_access(ctx: Context, a: RequestAccessArgs) -> RequestInfo:
    from .request_handlers import open_request

    req = await open_request(
        ctx, a.entry, a.space, a.field, a.duration_minutes, a.justification, a.access
    )
    from .approval_handlers import request_url
    from .page_offer import offer_page

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


REQUEST_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="request_access",
        title="Ask the person for access to one secret",
        description=(
            "Ask the person to let this session use one entry's secret (optionally one field) "
            "for a limited time. Give a specific justification. By default you ask for a use "
            "grant: once approved, get_access_details gives an `apm run` command line that puts "
            "the secret into a command's environment; you never see the value, and "
            'decrypt_entry/get_totp stay refused for that entry. Ask for access="reveal" only '
            "if you must read the value itself. The person approves in their terminal or on "
            "the approval page; follow up with get_request_status, then get_access_details."
        ),
        scope="read",
        args=RequestAccessArgs,
        out=RequestInfo,
        op="request.open",
        read_only=False,
        idempotent=False,
    ),
    ToolSpec(
        name="get_request_status",
        title="Status of an access request",
        description="pending, approved, denied, expired or revoked, with times and the reason.",
        scope="read",
        args=RequestRef,
        out=RequestInfo,
        op="request.status",
    ),
    ToolSpec(
        name="get_access_details",
        title="How to use an approved credential without seeing it",
        description=(
            "For an approved request: the apm:// reference and a ready `apm run` command line "
            "that injects the secret into a command's environment. Never returns the value."
        ),
        scope="read",
        args=RequestRef,
        out=AccessDetails,
        op="request.details",
    ),
    ToolSpec(
        name="list_my_requests",
        title="This session's access requests",
        description="Every access request this session made, with its state.",
        scope="read",
        args=Args,
        out=MyRequestsOut,
        op="request.mine",
    ),
)
