"""`tx.list`, `tx.approve`, `tx.deny`: the owner's side of the `owner` approval policy.

Approving proves the master password (it grants power); it marks the transaction approved and
the agent's next commit call executes exactly the stored arguments. A change the gate held
(it came as a wire request: an `apm` command or a raw frame) runs when it is approved.
"""

from __future__ import annotations

from broker.core.transactions import Transaction
from broker.wire.errors import TransactionConflict
from broker.wire.protocol import TxDecideParams, TxListParams, TxListResult, TxSummary

from .approval_handlers import tx_url
from .approval_view import shown_args
from .context import Context
from .dispatch import execute, log
from .operations import OWNER, OWNER_CHANGE, operation


def summary(tx: Transaction, ctx: Context) -> TxSummary:
    """The owner's view, with the exact stored arguments approving executes (#13.1)."""
    return tx.summary(ctx.state.clock()).model_copy(
        update={"args": shown_args(tx.params), "page_url": tx_url(ctx.state, tx.tx_id)}
    )


@operation("tx.list", OWNER)
async def process_tx_list(ctx: Context, p: TxListParams) -> TxListResult:
    states = {"pending", "awaiting_owner"} if p.pending else None
    return TxListResult(transactions=[summary(t, ctx) for t in ctx.state.txs.listing(None, states)])


async def _decide(ctx: Context, p: TxDecideParams, approve: bool) -> TxSummary:
    tx = ctx.state.txs.owner_decide(p.tx_id, approve, p.reason)
    ctx.state.links.drop("tx", tx.tx_id)  # decided: its page link ends here
    event = "tx.approved" if approve else "tx.denied"
    ctx.state.record(event, ctx, tx=tx.tx_id, by="owner", target=tx.accessor)
    if not (approve and tx.origin == "wire"):  # a held change's record lands with it
        await ctx.state.save_tx(tx)
    log.info("%s %s by the owner (pid=%s)", tx.tx_id, tx.state, ctx.peer.pid)
    if approve and tx.origin == "wire":  # held by the gate: nobody commits it later
        await _execute_held(ctx, tx)
    return summary(tx, ctx)


async def _execute_held(ctx: Context, tx: Transaction) -> None:
    """Run a held change the owner just approved, as the session that asked for it (its
    filter and scope still apply); the audit record naming the receipt precedes the change."""
    state = ctx.state
    rec = state.sessions().records.get(tx.accessor)
    if rec is None or rec.state(state.clock()) != "active":
        state.txs.conflicted(tx, "the session that asked for it has ended")
        await state.save_tx(tx)
        raise TransactionConflict(
            "the session that asked for this change has ended; nothing was changed",
            data={"tx_id": tx.tx_id},
        )
    as_session = Context(
        state=state,
        peer=ctx.peer,
        auth=None,
        request_id=ctx.request_id,
        session=rec,
        exe=ctx.exe,
    )
    done = await execute(as_session, tx)  # approved: the gate's approval step lets it run
    if done is None:  # never for an approved transaction; say so rather than report success
        raise TransactionConflict("the change did not run", data={"tx_id": tx.tx_id})
    log.info("committed held %s (%s) receipt %s", tx.tx_id, tx.method, done[1])


@operation("tx.approve", OWNER_CHANGE)
async def process_tx_approve(ctx: Context, p: TxDecideParams) -> TxSummary:
    return await _decide(ctx, p, True)


@operation("tx.deny", OWNER_CHANGE)
async def process_tx_deny(ctx: Context, p: TxDecideParams) -> TxSummary:
    return await _decide(ctx, p, False)
