"""The approval policy's two ends for changes that arrive as wire requests (an `apm` command
run with a session, or a raw frame): `hold` turns the change into a pending transaction, and
`tx_handlers` runs it once the person has approved it with `apm tx approve`.

Rules:
- A held change is pinned before it is stored: the entry by id and version, a space by the
  entries it holds. Approving executes exactly those arguments or nothing
  (TRANSACTION_CONFLICT), never a later state of the vault.
- The preview is the one the MCP write tools show for the same change (secret values masked).
- Only the owner executes a held change (`tx.approve` is owner-only); the agent can neither
  approve nor commit it.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from pydantic import BaseModel

from broker.wire.errors import ApprovalPending, InvalidParameters, TransactionConflict
from broker.wire.protocol import (
    EntryAddParams,
    EntryEditParams,
    EntryRemoveParams,
    SpaceAddParams,
    SpaceRemoveParams,
    SpaceRenameParams,
)

from .context import Context
from .operations import Operation
from .planners import (
    AddEntryArgs,
    DeleteEntryArgs,
    EditEntryArgs,
    ManageSpacesArgs,
    Plan,
    _plan_add,
    _plan_delete,
    _plan_edit,
    _plan_spaces,
)

# below the gate (`dispatch` imports `hold`): nothing here runs an operation
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


async def hold(ctx: Context, op: Operation, params: BaseModel) -> NoReturn:
    """Store the change as a pending transaction and answer APPROVAL_PENDING."""
    rec = ctx.session
    if rec is None:  # the gate holds only a session's changes
        raise InvalidParameters("only a session's changes are held for approval")
    made = await plan(ctx, op.name, params)
    tx = ctx.state.txs.create(
        accessor=rec.accessor,
        label=rec.label,
        tool=op.name,
        method=made.method,
        params=made.params,
        raw_args={},
        preview=made.preview,
        policy=rec.approve,
        entry_id=made.entry_id,
        base_updated_at=made.base_updated_at,
        origin="wire",
    )
    await ctx.state.save_new_tx(tx)
    ctx.state.record("tx.preview", ctx, tx=tx.tx_id, tool=op.name, hash=tx.hash)
    log.info("%s held as %s for session %s (%s)", op.name, tx.tx_id, rec.accessor, rec.approve)
    from .approval_handlers import notify_tx, tx_url

    if rec.approve == "owner":
        notify_tx(ctx.state, tx)
    command = f"apm tx approve {tx.tx_id}"
    page = tx_url(ctx.state, tx.tx_id)
    raise ApprovalPending(
        f"this session's changes need the person's approval; held as {tx.tx_id}",
        hint=f'the person reviews it with "apm tx ls" and approves it with "{command}"'
        + (f" or on the page {page} (on this machine)" if page else ""),
        data={"tx_id": tx.tx_id, "approve": command, "preview": tx.preview, "page_url": page},
    )
