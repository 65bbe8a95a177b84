"""Write tools (scope `write`) and transaction tools: preview -> tx_id -> approve -> receipt.

A write tool called without `tx_id` validates and normalises its arguments, stores them with
their hash in a pending transaction bound to the session and the tool, and returns a readable
preview with secret values masked. Called with `{tx_id, approve: true}` it executes the stored
arguments — never the commit call's — once whoever the session's policy names has approved.

Rules:
- A commit call carrying other arguments that differ from the previewed ones is refused.
- If the entry changed since the preview, the commit fails with TRANSACTION_CONFLICT and a
  fresh preview.
- The audit record naming the transaction and its receipt is written before the change; if
  it cannot be written the commit is refused.
- The `client` policy asks the person through MCP elicitation; a client that cannot be asked
  cannot commit (fail closed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

import mcp.types as types
from pydantic import BaseModel

from broker.core.sessions import scope_rank
from broker.core.transactions import Transaction
from broker.wire.display import escape
from broker.wire.entries import (
    EntryMeta,
)
from broker.wire.errors import (
    ApmError,
    ApprovalDenied,
    InternalError,
    InvalidParameters,
    PermissionDenied,
    TransactionConflict,
)
from broker.wire.protocol import (
    TxInfo,
)

from .approval_view import approval_lines
from .context import Context
from .dispatch import invoke
from .operations import find
from .planners import (
    AddEntryArgs,
    Build,
    DeleteEntryArgs,
    EditEntryArgs,
    GeneratePasswordArgs,
    ManageSpacesArgs,
    TxArgs,
    _plan_add,
    _plan_delete,
    _plan_edit,
    _plan_generate,
    _plan_spaces,
)
from .tool_base import ToolSpec
from .tool_operations import TxListArgs, TxListOut, TxStatusArgs

log = logging.getLogger("apm.broker.tx")


class WriteOut(BaseModel):
    status: Literal["pending", "pending_owner_approval", "committed"]
    tx_id: str
    tool: str
    preview: str
    policy: str
    expires_at: datetime | None = None
    receipt: str | None = None
    next_step: str
    entry: EntryMeta | None = None
    generated: str | None = None  # a generated password, only for sessions with `secrets`


# ------------------------------------------------------------------ the two phases


async def _execute(ctx: Context, tx: Transaction) -> Any:
    """Run an approved transaction through the gate: the operation it names (a wire method's,
    or one only a tool proposes) checks the approval and runs exactly the stored params."""
    op = find(tx.method)
    if op is None:  # a transaction is only ever created by a planner naming an operation
        raise InternalError(f"no operation {tx.method[:64]!r}")
    return await invoke(ctx, op, tx.params, tx=tx)


def _commit_hint(tool: str, tx_id: str) -> str:
    return f'call {tool} with {{"tx_id": "{tx_id}", "approve": true}} to execute it'


async def _preview(ctx: Context, tool: str, a: TxArgs, build: Build) -> WriteOut:
    rec = ctx.session
    if rec is None:
        raise PermissionDenied("write tools need a session")
    plan = await build(ctx, a)
    raw = a.model_dump(exclude={"tx_id", "approve"}, exclude_unset=True)
    tx = ctx.state.txs.create(
        accessor=rec.accessor,
        label=rec.label,
        tool=tool,
        method=plan.method,
        params=plan.params,
        raw_args=raw,
        preview=plan.preview,
        policy="owner" if plan.owner_only else rec.approve,
        entry_id=plan.entry_id,
        base_updated_at=plan.base_updated_at,
        extra={"generated": plan.generated} if plan.generated else {},
    )
    await ctx.state.save_new_tx(tx)
    ctx.state.record("tx.preview", ctx, tx=tx.tx_id, tool=tool, hash=tx.hash)
    who = {
        "agent": "this session may commit it itself",
        "client": "the person will be asked to confirm in the client",
        "owner": 'the owner approves it with "apm tx approve"',
    }["owner" if plan.owner_only else rec.approve]
    return WriteOut(
        status="pending",
        tx_id=tx.tx_id,
        tool=tool,
        preview=tx.preview,
        policy=tx.policy,
        expires_at=tx.expires_at,
        next_step=f"{_commit_hint(tool, tx.tx_id)}; {who}",
    )


async def _ask_person(ctx: Context, tx: Transaction) -> None:
    """The `client` policy: a yes/no confirmation through MCP elicitation (fail closed)."""
    mctx = ctx.mcp
    capable = mctx is not None and mctx.session.check_client_capability(
        types.ClientCapabilities(elicitation=types.ElicitationCapability())
    )
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


async def _commit(ctx: Context, tool: str, a: TxArgs, build: Build) -> WriteOut:
    rec = ctx.session
    if rec is None:
        raise PermissionDenied("write tools need a session")
    if not a.approve:
        raise InvalidParameters(
            "a call with tx_id commits: pass approve: true", hint="or use tx_status to look at it"
        )
    tx = ctx.state.txs.for_commit(a.tx_id or "", rec.accessor, tool)
    given = a.model_dump(exclude={"tx_id", "approve"}, exclude_unset=True)
    differing = sorted(k for k, v in given.items() if tx.raw_args.get(k) != v)
    if differing:
        raise InvalidParameters(
            "the commit call's arguments differ from the previewed ones; nothing was changed",
            hint=f'commit with only {{"tx_id": "{tx.tx_id}", "approve": true}}, or preview anew',
            data={"fields": differing},
        )
    if tx.policy == "owner" and tx.state != "approved":
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
        return WriteOut(
            status="pending_owner_approval",
            tx_id=tx.tx_id,
            tool=tool,
            preview=tx.preview,
            policy=tx.policy,
            expires_at=tx.expires_at,
            next_step="the person was sent the approval page; or ask them to run "
            f'"apm tx approve {tx.tx_id}"; then '
            f"{_commit_hint(tool, tx.tx_id)} again (tx_status shows the decision)",
        )
    if tx.policy == "client" and tx.state != "approved":
        await _ask_person(ctx, tx)
    if tx.entry_id is not None:
        current = ctx.state.cache.get().entries.get(tx.entry_id)
        if current is None or current.updated_at != tx.base_updated_at:
            raise await _conflict(ctx, tool, tx, build)
    receipt = ctx.state.txs.new_receipt()
    ctx.state.record("tx.commit", ctx, tx=tx.tx_id, receipt=receipt, tool=tool, hash=tx.hash)
    try:
        # the handler re-checks `expect_updated_at` under the write lock: nothing slips between
        with ctx.state.landing(tx, receipt) as at:  # its record lands with the change
            result = await _execute(ctx, tx)
    except TransactionConflict:
        raise await _conflict(ctx, tool, tx, build) from None
    ctx.state.txs.committed(tx, receipt, at)
    await ctx.state.save_tx(tx)  # unless it landed with the change (a plugin's, say)
    log.info("committed %s (%s) receipt %s session %s", tx.tx_id, tool, receipt, rec.accessor)
    entry = getattr(result, "entry", None)
    generated = tx.extra.get("generated")
    return WriteOut(
        status="committed",
        tx_id=tx.tx_id,
        tool=tool,
        preview=tx.preview,
        policy=tx.policy,
        receipt=receipt,
        next_step="done",
        entry=entry if isinstance(entry, EntryMeta) else None,
        generated=generated
        if generated and scope_rank(rec.scope) >= scope_rank("secrets")
        else None,
    )


async def _conflict(ctx: Context, tool: str, tx: Transaction, build: Build) -> TransactionConflict:
    """Close `tx` and make a fresh preview of the same arguments against the current entry."""
    ctx.state.txs.conflicted(tx, "conflict: the entry changed since the preview")
    ctx.state.record("tx.conflict", ctx, tx=tx.tx_id, tool=tool)
    await ctx.state.save_tx(tx)
    fresh: WriteOut | None = None
    with contextlib.suppress(ApmError):  # the entry or space may be gone: no fresh preview
        fresh = await _preview(ctx, tool, _args_model(tool).model_validate(tx.raw_args), build)
    return TransactionConflict(
        data={
            "tx_id": fresh.tx_id if fresh else None,
            "preview": fresh.preview if fresh else None,
        }
    )


_ARGS: dict[str, type[TxArgs]] = {}


def _args_model(tool: str) -> type[TxArgs]:
    return _ARGS[tool]


def two_phase(tool: str, args: type[TxArgs], build: Build) -> Callable[[Context, Any], Any]:
    _ARGS[tool] = args

    async def run(ctx: Context, a: TxArgs) -> WriteOut:
        if a.tx_id is None:
            if a.approve:
                raise InvalidParameters("approve needs the tx_id of a preview")
            return await _preview(ctx, tool, a, build)
        return await _commit(ctx, tool, a, build)

    return run


# ------------------------------------------------------------------ transaction tools


WRITE_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="add_entry",
        title="Add an entry (two-phase)",
        description=(
            "Add a credential to the vault. First call without tx_id: returns a preview (secret "
            "values masked) and a tx_id. Then call again with {tx_id, approve: true} to commit; "
            "depending on the session's policy the person may have to approve."
        ),
        scope="write",
        args=AddEntryArgs,
        out=WriteOut,
        run=two_phase("add_entry", AddEntryArgs, _plan_add),
        read_only=False,
        idempotent=False,
    ),
    ToolSpec(
        name="edit_entry",
        title="Edit an entry (two-phase)",
        description=(
            "Change an entry's name, space, tags, url, notes, fields or secrets. Preview first "
            "(no tx_id), then commit with {tx_id, approve: true}. Old secret values are kept in "
            "the entry's history."
        ),
        scope="write",
        args=EditEntryArgs,
        out=WriteOut,
        run=two_phase("edit_entry", EditEntryArgs, _plan_edit),
        read_only=False,
        idempotent=False,
    ),
    ToolSpec(
        name="delete_entry",
        title="Delete an entry (two-phase)",
        description="Delete an entry. Preview first, then commit with {tx_id, approve: true}.",
        scope="write",
        args=DeleteEntryArgs,
        out=WriteOut,
        run=two_phase("delete_entry", DeleteEntryArgs, _plan_delete),
        read_only=False,
        destructive=True,
        idempotent=False,
    ),
    ToolSpec(
        name="manage_spaces",
        title="Create, rename or remove a space (two-phase)",
        description=(
            "action=create|rename|remove on a space (a group of entries). Removing a non-empty "
            "space needs force=true. Preview first, then commit with {tx_id, approve: true}."
        ),
        scope="write",
        args=ManageSpacesArgs,
        out=WriteOut,
        run=two_phase("manage_spaces", ManageSpacesArgs, _plan_spaces),
        read_only=False,
        destructive=True,
        idempotent=False,
    ),
    ToolSpec(
        name="generate_password",
        title="Generate a password into an entry (two-phase)",
        description=(
            "Generate a random password (length, character classes) straight into an entry's "
            "secret field — an existing entry, or a new one when `type` is given. The value is "
            "returned only to sessions with the secrets scope. Preview, then commit."
        ),
        scope="write",
        args=GeneratePasswordArgs,
        out=WriteOut,
        run=two_phase("generate_password", GeneratePasswordArgs, _plan_generate),
        read_only=False,
        idempotent=False,
    ),
    ToolSpec(
        name="tx_status",
        title="Status of a transaction",
        description=(
            "Status of one of this session's transactions: pending, awaiting_owner, approved, "
            "committed (with its receipt), aborted, denied or expired."
        ),
        scope="write",
        args=TxStatusArgs,
        out=TxInfo,
        op="tx.status",
    ),
    ToolSpec(
        name="tx_list",
        title="List this session's transactions",
        description="This session's transactions, optionally filtered by status.",
        scope="admin",
        args=TxListArgs,
        out=TxListOut,
        op="tx.mine",
    ),
    ToolSpec(
        name="tx_abort",
        title="Abort a transaction",
        description="Abort one of this session's pending transactions.",
        scope="admin",
        args=TxStatusArgs,
        out=TxInfo,
        op="tx.abort",
        read_only=False,
        idempotent=True,
    ),
)
