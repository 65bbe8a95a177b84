"""The approval policy, written once: which change becomes a pending transaction, with which
policy, and what a transaction needs before it runs. The gate (`dispatch`) calls it for every
path: a tool's preview and commit, a session's wire change, the owner's approval.

- `open_tx` is the one place a change becomes a pending transaction (the policy is chosen here).
- `hold`: a session whose policy is `owner` or `client` sends a change as a wire request (an
  `apm` command, a raw frame): it is held and the call answers APPROVAL_PENDING; approving it
  with `apm tx approve` runs it (tx_handlers).
- `settle`: before a transaction runs, the decision its policy names: `agent` its own commit,
  `client` the person through MCP elicitation, `owner` `apm tx approve` or the approval page.

Rules:
- A held change is pinned before it is stored: the entry by id and version, a space by the
  entries it holds. Approving executes exactly those arguments or nothing
  (TRANSACTION_CONFLICT), never a later state of the vault.
- The preview is the one the MCP write tools show for the same change (secret values masked).
- Only the owner executes a held change (`tx.approve` is owner-only); the agent can neither
  approve nor commit it.
- A client that cannot be asked never counts as the person's yes (fail closed).
- The transaction's states change only through `core.transactions.TxStore`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, NoReturn

from pydantic import BaseModel

from broker.core.sessions import SessionRecord
from broker.core.transactions import Transaction
from broker.wire.display import escape
from broker.wire.errors import (
    ApprovalDenied,
    ApprovalPending,
    InvalidParameters,
    PermissionDenied,
    TransactionConflict,
)
from broker.wire.protocol import (
    EntryAddParams,
    EntryEditParams,
    EntryRemoveParams,
    SpaceAddParams,
    SpaceRemoveParams,
    SpaceRenameParams,
)

from .approval_view import approval_lines
from .context import Context
from .operations import Operation
from .planners import (
    AddEntryArgs,
    DeleteEntryArgs,
    EditEntryArgs,
    ManageSpacesArgs,
    Plan,
    Proposal,
    _plan_add,
    _plan_delete,
    _plan_edit,
    _plan_spaces,
)

# below the gate (`dispatch` imports it): nothing here runs an operation
log = logging.getLogger("apm.broker")


def _revealed(values: dict[str, object]) -> dict[str, str]:
    return {k: v.value.get_secret_value() for k, v in values.items()}  # type: ignore[attr-defined]


async def plan(ctx: Context, method: str, p: BaseModel) -> Plan:
    """The pinned arguments and the preview of a wire change, as the write tools make them."""
    if isinstance(p, EntryAddParams):
        return await _plan_add(
            ctx,
            AddEntryArgs(
                type=p.type,
                name=p.name,
                space=p.space,
                tags=p.tags,
                url=p.url,
                notes=p.notes,
                fields=p.fields,
                secrets=_revealed(dict(p.secrets)),
            ),
        )
    if isinstance(p, EntryEditParams):
        out = await _plan_edit(
            ctx,
            EditEntryArgs(
                entry=p.ref,
                space=p.space,
                new_name=p.new_name,
                move_to=p.move_to,
                add_tags=p.add_tags,
                remove_tags=p.remove_tags,
                url=p.url,
                notes=p.notes,
                fields=p.fields,
                secrets=_revealed(dict(p.secrets)),
                remove_fields=p.remove_fields,
            ),
        )
        _expect(p.expect_updated_at, out.base_updated_at, out.entry_id)
        return out
    if isinstance(p, EntryRemoveParams):
        out = await _plan_delete(ctx, DeleteEntryArgs(entry=p.ref, space=p.space))
        _expect(p.expect_updated_at, out.base_updated_at, out.entry_id)
        return out
    if isinstance(p, SpaceAddParams):
        return await _plan_spaces(ctx, ManageSpacesArgs(action="create", name=p.name))
    if isinstance(p, SpaceRenameParams | SpaceRemoveParams):
        if isinstance(p, SpaceRenameParams):
            args = ManageSpacesArgs(action="rename", name=p.name, new_name=p.new_name)
        else:
            args = ManageSpacesArgs(action="remove", name=p.name, force=p.force)
        out = await _plan_spaces(ctx, args)
        held = getattr(out.params, "expect_entries", None)
        if p.expect_entries is not None and set(p.expect_entries) != set(held or ()):
            raise TransactionConflict(
                "the space's entries changed since the preview", data={"space": p.name}
            )
        return out
    raise InvalidParameters(f"{method} cannot be held for approval")


def _expect(expected: object, current: object, entry_id: str | None) -> None:
    if expected is not None and expected != current:
        raise TransactionConflict(data={"entry": entry_id})


def policy_of(rec: SessionRecord, made: Plan) -> str:
    """Who approves a change: the owner for what only the owner may allow (a plugin, the sync
    cluster), else the approval policy of the session that asks."""
    return "owner" if made.owner_only else rec.approve


async def open_tx(
    ctx: Context,
    tool: str,
    made: Plan,
    *,
    origin: Literal["tool", "wire"],
    raw_args: dict[str, Any] | None = None,
) -> Transaction:
    """The one place a change becomes a pending transaction: pinned arguments, preview and the
    policy that decides it, stored (durably when a person decides it) and recorded."""
    rec = ctx.session
    if rec is None:  # the gate holds only a session's changes
        raise InvalidParameters("only a session's changes are held for approval")
    policy = policy_of(rec, made)
    tx = ctx.state.txs.create(
        accessor=rec.accessor,
        label=rec.label,
        tool=tool,
        method=made.method,
        params=made.params,
        raw_args=raw_args or {},
        preview=made.preview,
        policy=policy,
        entry_id=made.entry_id,
        base_updated_at=made.base_updated_at,
        extra={"generated": made.generated} if made.generated else {},
        origin=origin,
    )
    await ctx.state.save_new_tx(tx)
    ctx.state.record("tx.preview", ctx, tx=tx.tx_id, tool=tool, hash=tx.hash)
    return tx


async def hold(
    ctx: Context, op: Operation, params: BaseModel, proposal: Proposal | None = None
) -> NoReturn:
    """Store the change as a pending transaction and answer APPROVAL_PENDING naming it.

    `proposal`: a tool's preview (planned from the tool's arguments): its transaction is
    committed by the tool's next call, after `settle`. Else a wire change: planned here from
    its params, and run when the person approves it (`apm tx approve`)."""
    if proposal is not None:
        tx = await open_tx(
            ctx, proposal.tool, proposal.plan, origin="tool", raw_args=proposal.raw_args
        )
        raise ApprovalPending(
            f"previewed as {tx.tx_id}", data={"tx_id": tx.tx_id, "preview": tx.preview}
        )
    made = await plan(ctx, op.name, params)
    tx = await open_tx(ctx, op.name, made, origin="wire")
    log.info("%s held as %s for session %s (%s)", op.name, tx.tx_id, tx.accessor, tx.policy)
    from .approval_handlers import notify_tx, tx_url

    if tx.policy == "owner":
        notify_tx(ctx.state, tx)
    command = f"apm tx approve {tx.tx_id}"
    page = tx_url(ctx.state, tx.tx_id)
    raise ApprovalPending(
        f"this session's changes need the person's approval; held as {tx.tx_id}",
        hint=f'the person reviews it with "apm tx ls" and approves it with "{command}"'
        + (f" or on the page {page} (on this machine)" if page else ""),
        data={"tx_id": tx.tx_id, "approve": command, "preview": tx.preview, "page_url": page},
    )


async def settle(ctx: Context, tx: Transaction) -> bool:
    """The approval its policy names, asked for when a transaction is to run: True once it may
    run; False while it awaits the owner (notified once, offered the approval page).

    `agent`: the session's own commit is its approval. `client`: the person is asked through
    MCP elicitation now (fail closed: a client that cannot ask cannot commit). `owner`: only
    `apm tx approve` or the approval page decide."""
    if tx.standing == "approved" or tx.policy == "agent":
        return True
    if tx.policy == "client":
        await _ask_person(ctx, tx)
        return True
    from .approval_handlers import notify_tx, tx_url
    from .page_offer import offer_page

    first = tx.state == "pending"
    ctx.state.txs.await_owner(tx)
    if first:  # notified once, when the agent first asks to commit
        await ctx.state.save_tx(tx)
        notify_tx(ctx.state, tx)
    await offer_page(
        ctx.mcp,
        tx_url(ctx.state, tx.tx_id),
        f"An AI agent ({escape(tx.label or tx.accessor)}) wants to make a change that "
        "needs your approval. Open the apm approval page on this machine to decide.",
    )
    return False


async def _ask_person(ctx: Context, tx: Transaction) -> None:
    """The `client` policy: a yes/no confirmation through MCP elicitation (fail closed)."""
    mctx = ctx.mcp
    capable = mctx is not None and mctx.session.check_client_capability(_elicitation_capability())
    if not capable:
        raise PermissionDenied(
            "this session's writes must be confirmed by the person, and this client cannot ask",
            hint="use a client with MCP elicitation support, or ask the owner for a session with "
            '"apm delegate --approve owner"',
        )
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"approve": {"type": "boolean", "title": "Approve this change"}},
        "required": ["approve"],
    }
    message = "\n".join(
        [f"An AI agent ({escape(tx.label or tx.accessor)}) wants to make this change:"]
        + [escape(line, backslash=False) for line in tx.preview.splitlines()]
        + approval_lines(tx.method, tx.params)
    )
    try:
        answer = await mctx.session.elicit_form(message, schema, mctx.request_id)
    except Exception as exc:
        raise PermissionDenied(
            "could not ask the person for approval; the change was not made",
            hint="retry from a client that supports elicitation",
        ) from exc
    approved = answer.action == "accept" and bool((answer.content or {}).get("approve"))
    ctx.state.txs.person_decided(
        tx, approved, None if approved else f"person answered {answer.action}"
    )
    if not approved:
        await ctx.state.save_tx(tx)
        ctx.state.record("tx.denied", ctx, tx=tx.tx_id, by="client", answer=answer.action)
        raise ApprovalDenied("the person did not approve the change", data={"tx_id": tx.tx_id})
    ctx.state.record("tx.approved", ctx, tx=tx.tx_id, by="client")


def _elicitation_capability() -> Any:
    """What a client declares when it can be asked."""
    import mcp.types as types  # the SDK only once a person is asked (dispatch loads no mcp)

    return types.ClientCapabilities(elicitation=types.ElicitationCapability())
