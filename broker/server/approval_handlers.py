"""The approval page's wire operations: `approval.link` (the page for a pending transaction or
request, so `--passkey` can open it), `passkey.begin` (owner: a one-time registration page) and
`passkey.list`.

The decisions themselves are `tx.approve|deny` and `request.approve|deny`: the page runs those
same operations through the gate, with the person's proof (approval_page.py).
"""

from __future__ import annotations

from datetime import timedelta

from broker.core.transactions import Transaction
from broker.wire.errors import InvalidParameters
from broker.wire.protocol import (
    ApprovalLinkParams,
    ApprovalLinkResult,
    Empty,
    PasskeyBeginResult,
    PasskeyInfo,
    PasskeyListResult,
    PasskeyRemoveParams,
)

from .context import Context
from .operations import ANYONE_UNLOCKED, OWNER, OWNER_CHANGE, operation
from .state import State

REGISTRATION_TTL = timedelta(minutes=10)
OPEN_TX = ("pending", "awaiting_owner")


def page_lines(url: str | None, command: str) -> list[str]:
    """What every notification says about deciding: the page (a loopback link, so only on this
    machine) and the terminal command."""
    lines = []
    if url is not None:
        lines.append(
            f"Decide on the approval page (a loopback link: it opens on this machine): {url}"
        )
    lines.append(f"Or in a terminal: {command}")
    return lines


def notify_tx(state: State, tx: Transaction) -> None:
    """A write awaits the owner: say so everywhere notifications go (never a value)."""
    if state.notifier is None:
        return
    url = tx_url(state, tx.tx_id)
    command = f"apm tx approve {tx.tx_id}"
    who = tx.label or tx.accessor
    title = f"apm: {who} wants to run {tx.method}; it awaits your approval"
    body = "\n".join(
        [f"{tx.tool} ({tx.method}), transaction {tx.tx_id}", *page_lines(url, command)]
    )
    payload = {
        "event": "tx",
        "tx_id": tx.tx_id,
        "tool": tx.tool,
        "method": tx.method,
        "session_label": who,
        "state": tx.status(state.clock()),
        "approve_command": command,
        "page_url": url,
    }
    state.notifier.send(title, body, payload)


def tx_url(state: State, tx_id: str) -> str | None:
    """The page for a transaction while it awaits a person (never for the agent's own)."""
    tx = state.txs.txs.get(tx_id)
    if tx is None or tx.policy == "agent" or tx.status(state.clock()) not in OPEN_TX:
        return None
    return state.links.url("tx", tx_id)


def request_url(state: State, req_id: str) -> str | None:
    req = state.requests().records.get(req_id)
    if req is None or req.status(state.clock()) != "pending":
        return None
    return state.links.url("request", req_id)


@operation("approval.link", ANYONE_UNLOCKED)
async def process_approval_link(ctx: Context, p: ApprovalLinkParams) -> ApprovalLinkResult:
    """Anyone may learn a pending item's page: it decides nothing without the person's proof,
    and it is what the notifications and the AI client are given anyway."""
    state = ctx.state
    if p.kind == "tx":
        tx = state.txs.get(p.id, None)
        return ApprovalLinkResult(url=tx_url(state, p.id), state=tx.status(state.clock()))
    req = state.requests().get(p.id, None)
    return ApprovalLinkResult(url=request_url(state, p.id), state=req.status(state.clock()))


@operation("passkey.begin", OWNER)
async def process_passkey_begin(ctx: Context, p: Empty) -> PasskeyBeginResult:
    state = ctx.state
    if state.links.base is None:
        raise InvalidParameters(
            "this broker serves no approval page", hint="restart the broker (apm broker restart)"
        )
    expires = state.clock() + REGISTRATION_TTL
    state.links.drop("passkey", "register")  # one registration page at a time
    link = state.links.link("passkey", "register", expires_at=expires)
    state.record("passkey.begin", ctx)
    return PasskeyBeginResult(url=f"{state.links.base}/approve/{link.id}", expires_at=expires)


def _listing(raw: object) -> PasskeyListResult:
    return PasskeyListResult(
        passkeys=[
            PasskeyInfo(id=str(c["id"])[:12], label=str(c["label"]), created_at=c["created_at"])
            for c in (raw if isinstance(raw, list) else [])
        ]
    )


@operation("passkey.list", ANYONE_UNLOCKED)
async def process_passkey_list(ctx: Context, p: Empty) -> PasskeyListResult:
    return _listing(ctx.state.cache.get().extra.get("passkeys", []))


@operation("passkey.remove", OWNER_CHANGE)
async def process_passkey_remove(ctx: Context, p: PasskeyRemoveParams) -> PasskeyListResult:
    """Owner only: with no passkey left, the page asks for the master password again."""
    state = ctx.state
    vault = state.cache.get()
    current = vault.extra.get("passkeys", [])
    current = current if isinstance(current, list) else []
    kept = [c for c in current if not str(c["id"]).startswith(p.id)]
    if len(current) - len(kept) != 1:
        raise InvalidParameters(
            "name exactly one registered passkey", hint="apm passkey ls shows their ids"
        )

    def work() -> None:
        with vault.mutation():
            vault.extra["passkeys"] = kept

    async with state.write_lock:
        await state.io(work)
    state.record("passkey.removed", ctx)
    return _listing(kept)
