"""Write tools (scope `write`) and transaction tools: preview -> tx_id -> approve -> receipt.

A write tool called without `tx_id` previews its change: the gate stores the normalised
arguments with their hash in a pending transaction bound to the session and the tool, and the
tool returns a readable preview with secret values masked. Called with `{tx_id, approve: true}`
it executes the stored arguments — never the commit call's — once whoever the session's policy
names has approved.

Rules:
- A write tool is an adapter: it maps its arguments to the operations `tx.propose` /
  `tx.commit` (proposals.py), runs them through `dispatch.invoke`, and shapes the answer.
  Scope, the approval policy, elicitation, conflicts and the audit record are the gate's
  (dispatch.py, approval.py); nothing here decides them.
- A commit call carrying other arguments that differ from the previewed ones is refused.
- If the entry changed since the preview, the commit fails with TRANSACTION_CONFLICT and a
  fresh preview.
- The audit record naming the transaction and its receipt is written before the change; if
  it cannot be written the commit is refused.
- The `client` policy asks the person through MCP elicitation; a client that cannot be asked
  cannot commit (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.wire.errors import InternalError, InvalidParameters
from broker.wire.protocol import TxInfo

from .context import Context
from .dispatch import invoke
from .operations import TOOL_OPERATIONS
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
from .proposals import ProposeParams, TxOutcome, register
from .tool_base import ToolSpec
from .tool_operations import TxListArgs, TxListOut, TxStatusArgs


class WriteOut(TxOutcome):
    """A write tool's answer: where its change stands (the gate's `TxOutcome`) and what to do
    next, in words for the model."""

    next_step: str


# ------------------------------------------------------------------ the two phases

_WHO = {  # what the preview says about who approves (the gate decided it: `policy`)
    "agent": "this session may commit it itself",
    "client": "the person will be asked to confirm in the client",
    "owner": 'the owner approves it with "apm tx approve"',
}


def _commit_hint(tool: str, tx_id: str) -> str:
    return f'call {tool} with {{"tx_id": "{tx_id}", "approve": true}} to execute it'


def _shaped(out: TxOutcome) -> WriteOut:
    hint = _commit_hint(out.tool, out.tx_id)
    step = {
        "pending": f"{hint}; {_WHO.get(out.policy, _WHO['owner'])}",
        "pending_owner_approval": "the person was sent the approval page; or ask them to run "
        f'"apm tx approve {out.tx_id}"; then {hint} again (tx_status shows the decision)',
        "committed": "done",
    }[out.status]
    return WriteOut(next_step=step, **dict(out))


def two_phase(tool: str, args: type[TxArgs], build: Build) -> Callable[[Context, Any], Any]:
    """The tool `tool`: its arguments (`args`) and planner (`build`, arguments -> the operation
    and its params) registered for the gate; the call runs `tx.propose` or `tx.commit`."""
    register(tool, args, build)
    propose, commit = TOOL_OPERATIONS["tx.propose"], TOOL_OPERATIONS["tx.commit"]

    async def run(ctx: Context, a: TxArgs) -> WriteOut:
        if a.tx_id is None and a.approve:
            raise InvalidParameters("approve needs the tx_id of a preview")
        op = propose if a.tx_id is None else commit
        out = await invoke(ctx, op, ProposeParams(tool=tool, args=a))
        if not isinstance(out, TxOutcome):
            raise InternalError(f"{op.name} answered {type(out).__name__}")
        return _shaped(out)

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
        renamed=(("secrets", "field"), ("name", "entry")),  # the generated secret, a new entry
    ),
    ToolSpec(
        name="tx_status",
        title="Status of a transaction",
        description=(
            "Status of one of this session's transactions: pending, awaiting_owner, approved, "
            "committing (a commit call is running it), committed (with its receipt), aborted, "
            "denied or expired."
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
