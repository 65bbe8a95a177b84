"""A change an MCP tool proposes, through the gate: the preview call (`tx.propose`) plans it and
hands it to `dispatch.invoke` as a proposal, which makes it a pending transaction; the commit
call (`tx.commit`) runs it with `dispatch.execute`, once the approval its policy names is
given. The write tools (write_tools.two_phase) only map their arguments and shape the answer.

Rules:
- Both are operations with the `write` scope, so the gate refuses a session lacking it before a
  planner reads the vault; the planned operation's own rule (its scope, the approval policy)
  is then checked by the gate as on every path.
- Which policy a transaction gets and what it needs before it runs are decided in
  `approval.py` only; nothing here branches on a policy.
- A commit call carrying arguments that differ from the previewed ones is refused.
- If the entry changed since the preview, the commit fails with TRANSACTION_CONFLICT and a
  fresh preview of the same arguments.
- A generated password is returned only to a session with the `secrets` scope.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from broker.core.sessions import scope_rank
from broker.core.transactions import Transaction
from broker.wire.entries import EntryMeta
from broker.wire.errors import (
    ApmError,
    ApprovalPending,
    InternalError,
    InvalidParameters,
    SessionRequired,
    TransactionConflict,
)

from .context import Context
from .dispatch import execute, invoke
from .operations import Rule, find, tool_operation
from .planners import Build, Proposal, TxArgs

log = logging.getLogger("apm.broker.tx")

# tool -> (its arguments' model, its planner): filled by write_tools.two_phase
PLANNERS: dict[str, tuple[type[TxArgs], Build]] = {}


def register(tool: str, args: type[TxArgs], build: Build) -> None:
    if tool in PLANNERS:
        raise RuntimeError(f"tool {tool} proposes changes twice")
    PLANNERS[tool] = (args, build)


class ProposeParams(BaseModel):
    tool: str
    args: TxArgs  # already validated by the tool (its own model, kept as given)


class TxOutcome(BaseModel):
    """Where a tool's change stands after a call: previewed, awaiting the owner, or done."""

    status: Literal["pending", "pending_owner_approval", "committed"]
    tx_id: str
    tool: str
    preview: str
    policy: str
    expires_at: datetime | None = None
    receipt: str | None = None
    entry: EntryMeta | None = None
    generated: str | None = None  # a generated password, only for sessions with `secrets`


# the tool call is audited by its caller; the transaction's own events by the gate
TWO_PHASE = Rule(unlocked=True, scope="write", audit="none")


def _outcome(status: str, tx: Transaction, **more: object) -> TxOutcome:
    return TxOutcome.model_validate(
        {
            "status": status,
            "tx_id": tx.tx_id,
            "tool": tx.tool,
            "preview": tx.preview,
            "policy": tx.policy,
            "expires_at": None if status == "committed" else tx.expires_at,
            **more,
        }
    )


def _planner(tool: str) -> tuple[type[TxArgs], Build]:
    found = PLANNERS.get(tool)
    if found is None:
        raise InvalidParameters(f"{tool[:64]!r} proposes no change")
    return found


@tool_operation("tx.propose", ProposeParams, TxOutcome, TWO_PHASE, ())
async def propose(ctx: Context, p: ProposeParams) -> TxOutcome:
    """Plan the tool's change and hand it to the gate, which makes it a pending transaction."""
    rec = ctx.session
    if rec is None:
        raise SessionRequired("only a session proposes changes", hint="run the command itself")
    _, build = _planner(p.tool)
    made = await build(ctx, p.args)
    op = find(made.method)
    if op is None:
        raise InternalError(f"no operation {made.method[:64]!r}")
    raw = p.args.model_dump(exclude={"tx_id", "approve"}, exclude_unset=True)
    try:
        await invoke(ctx, op, made.params, proposal=Proposal(p.tool, made, raw))
    except ApprovalPending as held:
        return _outcome("pending", ctx.state.txs.get(held.data["tx_id"], rec.accessor))
    raise InternalError(f"{op.name} ran without a preview")  # the gate holds every proposal


@tool_operation("tx.commit", ProposeParams, TxOutcome, TWO_PHASE, ())
async def commit(ctx: Context, p: ProposeParams) -> TxOutcome:
    """Run the previewed transaction `p.args.tx_id` through the gate (`dispatch.execute`)."""
    rec = ctx.session
    if rec is None:
        raise SessionRequired("only a session commits its changes", hint="run the command itself")
    a = p.args
    if not a.approve:
        raise InvalidParameters(
            "a call with tx_id commits: pass approve: true", hint="or use tx_status to look at it"
        )
    tx = ctx.state.txs.for_commit(a.tx_id or "", rec.accessor, p.tool)
    given = a.model_dump(exclude={"tx_id", "approve"}, exclude_unset=True)
    differing = sorted(k for k, v in given.items() if tx.raw_args.get(k) != v)
    if differing:
        raise InvalidParameters(
            "the commit call's arguments differ from the previewed ones; nothing was changed",
            hint=f'commit with only {{"tx_id": "{tx.tx_id}", "approve": true}}, or preview anew',
            data={"fields": differing},
        )
    try:
        done = await execute(ctx, tx)
    except TransactionConflict:
        raise await _fresh_preview(ctx, p.tool, tx) from None
    if done is None:
        return _outcome("pending_owner_approval", tx)
    result, receipt = done
    log.info("committed %s (%s) receipt %s session %s", tx.tx_id, p.tool, receipt, rec.accessor)
    entry = getattr(result, "entry", None)
    generated = tx.extra.get("generated")
    return _outcome(
        "committed",
        tx,
        receipt=receipt,
        entry=entry if isinstance(entry, EntryMeta) else None,
        generated=generated
        if generated and scope_rank(rec.scope) >= scope_rank("secrets")
        else None,
    )


async def _fresh_preview(ctx: Context, tool: str, tx: Transaction) -> TransactionConflict:
    """The conflict answer: a fresh preview of the same arguments against the current vault."""
    args, _ = _planner(tool)
    fresh: TxOutcome | None = None
    with contextlib.suppress(ApmError):  # the entry or space may be gone: no fresh preview
        fresh = await propose(ctx, ProposeParams(tool=tool, args=args.model_validate(tx.raw_args)))
    return TransactionConflict(
        data={
            "tx_id": fresh.tx_id if fresh else None,
            "preview": fresh.preview if fresh else None,
        }
    )
