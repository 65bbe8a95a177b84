"""The person's side of just-in-time access, and `secret.resolve` for `apm run`.

- `request.list` (owner, or an admin session), `request.approve` (owner: it grants power),
  `request.deny` and `request.revoke` (no password: making things safer is one step).
- `secret.resolve` turns `apm://space/entry/field` references into values for `apm run`, for
  the owner, a session with `secrets`, or a session holding a live grant for each entry.
"""

from __future__ import annotations

from pydantic import SecretStr

from broker.core.requests import AccessRequest, GrantKind
from broker.wire.errors import InvalidParameters
from broker.wire.protocol import (
    AccessRequestInfo,
    RequestDecideParams,
    RequestListParams,
    RequestListResult,
    RequestRefParams,
    ResolvedSecret,
    SecretResolveParams,
    SecretResolveResult,
)

from .approval_handlers import page_lines, request_url
from .context import Context, totp_seed_field
from .dispatch import log
from .operations import ADMIN, ANYONE_UNLOCKED, OWNER, SECRETS_USE, operation


def _asks_for_seed(req: AccessRequest, ctx: Context) -> bool:
    """Does the request name a TOTP seed (codes forever, not only while the grant lasts)?"""
    vault = ctx.state.cache.peek()
    entry = vault.entries.get(req.entry_id) if vault is not None else None
    return entry is not None and req.field is not None and req.field == totp_seed_field(entry)


def request_info(req: AccessRequest, ctx: Context) -> AccessRequestInfo:
    """The wire view: the shared fields (`AccessRequest.shown`), whose it is, how to decide."""
    return AccessRequestInfo(
        **req.shown(ctx.state.clock()),
        session=req.accessor,
        label=req.label,
        totp_seed=_asks_for_seed(req, ctx),
        reference=req.reference(),
        approve_command=f"apm request approve {req.id}",
        page_url=request_url(ctx.state, req.id),
    )


def _notify(ctx: Context, req: AccessRequest, what: str) -> None:
    notifier = ctx.state.notifier
    if notifier is None:
        return
    url = request_url(ctx.state, req.id) if what == "request" else None
    payload = {
        "event": what,
        "request_id": req.id,
        "entry": req.entry_name,
        "space": req.space,
        "field": req.field,
        "session_label": req.label or req.accessor,
        "justification": req.justification,
        "duration_minutes": req.minutes,
        "access": req.access,
        "state": req.state,
        "approve_command": f"apm request approve {req.id}",
        "page_url": url,
    }
    if what == "request":
        seed = " (THE TOTP SEED, not only codes)" if _asks_for_seed(req, ctx) else ""
        kind = " TO REVEAL IT TO THE MODEL" if req.access == "reveal" else " (use only)"
        title = f"apm: {req.label or req.accessor} asks for {req.entry_name}{seed}{kind}"
        body = "\n".join(
            [
                f"{req.justification} ({req.minutes} min).",
                *page_lines(url, f"apm request approve {req.id}"),
            ]
        )
    else:
        title = f"apm: request {req.id} {req.state}"
        body = f"{req.entry_name} for {req.label or req.accessor}"
    notifier.send(title, body, payload)


async def open_request(
    ctx: Context,
    entry_ref: str,
    space: str | None,
    field: str | None,
    minutes: int,
    justification: str,
    access: GrantKind = "use",
) -> AccessRequest:
    if ctx.session is None:
        raise InvalidParameters("access requests come from a session")
    max_minutes = ctx.state.request_max_minutes
    if minutes > max_minutes:
        raise InvalidParameters(
            f"duration_minutes must be at most {max_minutes}",
            data={"fields": ["duration_minutes"]},
        )
    vault = ctx.state.cache.get()
    entry = vault.resolve(entry_ref, space, ctx.visible)
    if field is not None and field not in entry.fields:
        raise InvalidParameters("the entry has no such field", data={"fields": ["field"]})
    store = ctx.state.requests()
    req = store.create(
        accessor=ctx.session.accessor,
        label=ctx.session.label,
        entry_id=entry.id,
        entry_name=entry.name,
        space=entry.space,
        field=field,
        main_field=vault.default_field(entry),
        minutes=minutes,
        justification=justification.strip(),
        access=access,
    )
    try:
        ctx.state.record(
            "request.created",
            ctx,
            request=req.id,
            entry_id=entry.id,
            name=entry.name,
            field=field,
            minutes=minutes,
            access=access,
        )
        await ctx.state.persist_sessions()
    except Exception:
        store.discard(req.id)
        raise
    log.info("access request %s by %s for %s", req.id, ctx.session.accessor, entry.id)
    _notify(ctx, req, "request")
    return req


@operation("request.list", ADMIN)
async def process_request_list(ctx: Context, p: RequestListParams) -> RequestListResult:
    reqs = ctx.state.requests().listing(None, p.pending)
    return RequestListResult(requests=[request_info(r, ctx) for r in reqs])


async def _decide(ctx: Context, req: AccessRequest, event: str) -> AccessRequestInfo:
    ctx.state.links.drop("request", req.id)  # decided: its page link ends here
    ctx.state.record(
        event,
        ctx,
        request=req.id,
        target=req.accessor,
        entry_id=req.entry_id,
        minutes=req.minutes if req.state == "approved" else None,
        access=req.access if req.state == "approved" else None,
    )
    await ctx.state.persist_sessions()
    _notify(ctx, req, "decision")
    return request_info(req, ctx)


@operation("request.approve", OWNER)
async def process_request_approve(ctx: Context, p: RequestDecideParams) -> AccessRequestInfo:
    req = ctx.state.requests().decide(
        p.request_id, True, p.minutes, p.reason, ctx.state.request_max_minutes, p.use_only
    )
    return await _decide(ctx, req, "request.approved")


@operation("request.deny", ANYONE_UNLOCKED)
async def process_request_deny(ctx: Context, p: RequestDecideParams) -> AccessRequestInfo:
    req = ctx.state.requests().decide(
        p.request_id, False, None, p.reason, ctx.state.request_max_minutes
    )
    return await _decide(ctx, req, "request.denied")


@operation("request.revoke", ANYONE_UNLOCKED)
async def process_request_revoke(ctx: Context, p: RequestRefParams) -> AccessRequestInfo:
    req = ctx.state.requests().revoke(p.request_id)
    return await _decide(ctx, req, "request.revoked")


def parse_reference(ref: str) -> tuple[str, str, str | None]:
    """apm://<space>/<entry>/<field>  (field `-` or absent: the main secret)."""
    if not ref.startswith("apm://"):
        raise InvalidParameters("references look like apm://<space>/<entry>/<field>")
    parts = ref[len("apm://") :].split("/")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise InvalidParameters("references look like apm://<space>/<entry>/<field>")
    field = parts[2] if len(parts) == 3 and parts[2] not in ("", "-") else None
    return parts[0], parts[1], field


@operation("secret.resolve", SECRETS_USE)
async def process_secret_resolve(ctx: Context, p: SecretResolveParams) -> SecretResolveResult:
    vault = ctx.state.cache.get()
    out: list[ResolvedSecret] = []
    for ref in p.refs:
        space, name, field = parse_reference(ref)
        entry = vault.resolve(name, space, ctx.visible)
        field = field or vault.default_field(entry)
        ctx.check_grant(entry, field)
        _, value = vault.reveal(entry, field)
        out.append(ResolvedSecret(ref=ref, value=SecretStr(value)))
    ctx.state.record("secret.resolved", ctx, refs=",".join(p.refs)[:500])
    return SecretResolveResult(secrets=out)
