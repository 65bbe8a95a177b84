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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import mcp.types as types
from pydantic import BaseModel, Field, SecretStr

from broker.core.sessions import scope_rank
from broker.core.transactions import Transaction, state_allows
from broker.plugin_registry import entry_type
from broker.wire.display import escape
from broker.wire.entries import (
    NAME_MAX,
    SPACE_PATTERN,
    VALUE_MAX,
    EntryMeta,
    EntryType,
)
from broker.wire.errors import (
    ApmError,
    ApprovalDenied,
    EntryNotFound,
    InvalidParameters,
    PermissionDenied,
    SpaceNotFound,
    TransactionConflict,
)
from broker.wire.passwords import generate_password
from broker.wire.protocol import (
    EntryAddParams,
    EntryEditParams,
    EntryRemoveParams,
    SecretValue,
    SpaceAddParams,
    SpaceRemoveParams,
    SpaceRenameParams,
    TxInfo,
)

from .approval_view import approval_lines
from .context import Context
from .dispatch import invoke
from .operations import OPERATIONS
from .tool_base import Args, ToolSpec

log = logging.getLogger("apm.broker.tx")
MASK = "********"


class TxArgs(Args):
    tx_id: str | None = Field(default=None, max_length=64, description="commit this preview")
    approve: bool = Field(default=False, description="with tx_id: execute the previewed change")


# the wire's limits, published in the tools' input schemas: a refused value names the tool's
# own field (`secrets.password`), never a wire model's
Value = Annotated[str, Field(max_length=VALUE_MAX)]
Space = Annotated[str, Field(pattern=SPACE_PATTERN)]
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX)]
Tags = Annotated[list[Name], Field(max_length=64)]
Fields = Annotated[dict[str, Value], Field(max_length=64)]
Url = Annotated[str, Field(max_length=2048)]


class AddEntryArgs(TxArgs):
    type: EntryType | None = Field(
        default=None,
        description="login, totp, api_key, token, ssh_key, database, note, custom, or a type "
        "an enabled entry_type plugin adds",
    )
    name: Name | None = None
    space: Space = "default"
    tags: Tags = Field(default_factory=list)
    url: Url | None = None
    notes: Value | None = None
    fields: Fields = Field(default_factory=dict, description="non-secret fields")
    secrets: Fields = Field(default_factory=dict, description="secret fields")


class EditEntryArgs(TxArgs):
    entry: Name | None = Field(default=None, description="id or name")
    space: Space | None = None
    new_name: Name | None = None
    move_to: Space | None = None
    add_tags: Tags = Field(default_factory=list)
    remove_tags: Tags = Field(default_factory=list)
    url: Url | None = None
    notes: Value | None = None
    fields: Fields = Field(default_factory=dict)
    secrets: Fields = Field(default_factory=dict)
    remove_fields: Annotated[list[Name], Field(max_length=64)] = Field(default_factory=list)


class DeleteEntryArgs(TxArgs):
    entry: Name | None = None
    space: Space | None = None


class ManageSpacesArgs(TxArgs):
    action: Literal["create", "rename", "remove"] | None = None
    name: str | None = Field(default=None, pattern=SPACE_PATTERN)
    new_name: str | None = Field(default=None, pattern=SPACE_PATTERN)
    force: bool = False


class GeneratePasswordArgs(TxArgs):
    entry: Name | None = Field(default=None, description="entry to set, id/name")
    space: Space | None = None
    field: Name | None = Field(default=None, description="default: the type's main secret")
    type: EntryType | None = Field(default=None, description="create the entry with this type")
    length: int = Field(default=24, ge=8, le=128)
    lowercase: bool = True
    uppercase: bool = True
    digits: bool = True
    symbols: bool = True


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


class TxStatusArgs(Args):
    tx_id: str = Field(max_length=64)


class TxListArgs(Args):
    status: str | None = None


class TxListOut(BaseModel):
    transactions: list[TxInfo]


@dataclass
class Plan:
    method: str
    params: BaseModel
    preview: str
    entry_id: str | None = None
    base_updated_at: datetime | None = None
    generated: str | None = None
    owner_only: bool = False  # the owner approves, whatever the session's policy (plugins)


Build = Callable[[Context, Any], Awaitable[Plan]]


# ------------------------------------------------------------------ previews


def _fmt_fields(fields: dict[str, str], secret_names: list[str]) -> list[str]:
    lines = [f"  {escape(k)}: {escape(v)}" for k, v in fields.items()]
    lines += [f"  {escape(k)}: {MASK} (secret)" for k in secret_names]
    return lines


def _need(value: object, name: str) -> None:
    if value is None or value == "":
        raise InvalidParameters(f"{name} is required for a preview", data={"fields": [name]})


async def _plan_add(ctx: Context, a: AddEntryArgs) -> Plan:
    if a.type is None or not a.name:
        missing = [n for n, v in (("type", a.type), ("name", a.name)) if not v]
        raise InvalidParameters(
            "type and name are required for a preview", data={"fields": missing}
        )
    params = EntryAddParams(
        type=a.type,
        name=a.name,
        space=a.space,
        tags=a.tags,
        url=a.url,
        notes=a.notes,
        fields=a.fields,
        secrets={k: SecretValue(value=SecretStr(v)) for k, v in a.secrets.items()},
    )
    entry_type(a.type)  # a plugin's type: a clear error now, not at commit
    vault = ctx.state.cache.get()
    if not ctx.allows(a.space, a.tags, a.name):
        raise PermissionDenied("this session may not create entries outside its entry filter")
    if a.space not in vault.spaces:
        raise SpaceNotFound(hint="create it with manage_spaces", data={"space": a.space[:64]})
    lines = [f"+ add {a.type} {a.name!r} in space {a.space!r}"]
    lines += _fmt_fields(a.fields, list(a.secrets))
    if a.tags:
        lines.append(f"  tags: {', '.join(escape(t) for t in a.tags)}")
    if a.url:
        lines.append(f"  url: {escape(a.url)}")
    return Plan("entry.add", params, "\n".join(lines))


async def _plan_edit(ctx: Context, a: EditEntryArgs) -> Plan:
    _need(a.entry, "entry")
    vault = ctx.state.cache.get()
    entry = vault.resolve(a.entry or "", a.space, ctx.visible)
    params = EntryEditParams(
        ref=entry.id,
        expect_updated_at=entry.updated_at,
        new_name=a.new_name,
        move_to=a.move_to,
        add_tags=a.add_tags,
        remove_tags=a.remove_tags,
        url=a.url,
        notes=a.notes,
        fields=a.fields,
        secrets={k: SecretValue(value=SecretStr(v)) for k, v in a.secrets.items()},
        remove_fields=a.remove_fields,
    )
    lines = [f"~ edit {entry.type} {entry.name!r} (space {entry.space!r})"]
    if a.new_name:
        lines.append(f"  name: {escape(entry.name)} -> {escape(a.new_name)}")
    if a.move_to:
        lines.append(f"  space: {entry.space} -> {a.move_to}")
    for k, v in a.fields.items():
        old = entry.fields.get(k)
        before = old.value if old is not None and not old.secret else None
        shown = escape(before) if before is not None else "(none)"
        lines.append(f"  {escape(k)}: {shown} -> {escape(v)}")
    for k in a.secrets:
        lines.append(
            f"  {escape(k)}: {MASK} -> {MASK} (secret changed; the old value goes to history)"
        )
    for k in a.remove_fields:
        lines.append(f"  {escape(k)}: removed")
    if a.add_tags or a.remove_tags:
        added, removed = ",".join(map(escape, a.add_tags)), ",".join(map(escape, a.remove_tags))
        lines.append(f"  tags: +{added or '-'} -{removed or '-'}")
    if a.url is not None:
        lines.append(f"  url: {escape(entry.url or '(none)')} -> {escape(a.url or '(none)')}")
    if a.notes is not None:
        lines.append("  notes: changed")
    if len(lines) == 1:
        raise InvalidParameters("nothing to change", hint="name at least one change")
    return Plan("entry.edit", params, "\n".join(lines), entry.id, entry.updated_at)


async def _plan_delete(ctx: Context, a: DeleteEntryArgs) -> Plan:
    _need(a.entry, "entry")
    entry = ctx.state.cache.get().resolve(a.entry or "", a.space, ctx.visible)
    preview = f"- delete {entry.type} {entry.name!r} (space {entry.space!r}, id {entry.id})"
    params = EntryRemoveParams(ref=entry.id, expect_updated_at=entry.updated_at)
    return Plan("entry.remove", params, preview, entry.id, entry.updated_at)


async def _plan_spaces(ctx: Context, a: ManageSpacesArgs) -> Plan:
    _need(a.action, "action")
    _need(a.name, "name")
    ctx.require_unfiltered()
    name = a.name or ""
    vault = ctx.state.cache.get()
    if a.action == "create":
        return Plan("space.add", SpaceAddParams(name=name), f"+ create space {name!r}")
    counts = vault.space_counts()
    if name not in counts:
        raise SpaceNotFound(hint="list them with assist", data={"space": name[:64]})
    held = sorted(e.id for e in vault.iter_entries(space=name))
    if a.action == "rename":
        _need(a.new_name, "new_name")
        params: BaseModel = SpaceRenameParams(
            name=name, new_name=a.new_name or "", expect_entries=held
        )
        return Plan(
            "space.rename",
            params,
            f"~ rename space {name!r} -> {a.new_name!r} ({counts[name]} entries move with it)",
        )
    preview = f"- remove space {name!r}"
    if counts[name]:
        preview += f" AND its {counts[name]} entries" if a.force else f" ({counts[name]} entries)"
    return Plan(
        "space.remove", SpaceRemoveParams(name=name, force=a.force, expect_entries=held), preview
    )


def generate(a: GeneratePasswordArgs) -> str:
    return generate_password(
        a.length, lowercase=a.lowercase, uppercase=a.uppercase, digits=a.digits, symbols=a.symbols
    )


async def _plan_generate(ctx: Context, a: GeneratePasswordArgs) -> Plan:
    _need(a.entry, "entry")
    value = generate(a)
    vault = ctx.state.cache.get()
    try:
        entry = vault.resolve(a.entry or "", a.space, ctx.visible)
    except EntryNotFound:
        if a.type is None:
            raise EntryNotFound(
                "no such entry", hint="pass `type` to create a new entry with this password"
            ) from None
        field = a.field or entry_type(a.type).primary or "password"
        plan = await _plan_add(
            ctx,
            AddEntryArgs(
                type=a.type, name=a.entry, space=a.space or "default", secrets={field: value}
            ),
        )
        plan.preview += f"\n  ({field}: generated, {a.length} characters)"
        plan.generated = value
        return plan
    field = a.field or entry_type(entry.type).primary or "password"
    plan = await _plan_edit(ctx, EditEntryArgs(entry=entry.id, secrets={field: value}))
    plan.preview += f"\n  ({field}: generated, {a.length} characters)"
    plan.generated = value
    return plan


# ------------------------------------------------------------------ the two phases


# changes a tool may commit that are not broker operations (plugin.enable): they run after
# the same approval check the gate makes for operations
_EXECUTE: dict[str, Callable[[Context, Any], Awaitable[Any]]] = {}


async def _execute(ctx: Context, tx: Transaction) -> Any:
    """Run an approved transaction: an operation through the gate, else its registered runner."""
    op = OPERATIONS.get(tx.method)
    if op is not None:
        return await invoke(ctx, op, tx.params, tx=tx)
    if not state_allows(tx, ctx.state.clock()):
        raise PermissionDenied(
            "this change was not approved", hint="preview it again and have it approved"
        )
    return await _EXECUTE[tx.method](ctx, tx.params)


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


async def _tx_status(ctx: Context, a: TxStatusArgs) -> TxInfo:
    accessor = ctx.session.accessor if ctx.session is not None else None
    tx = ctx.state.txs.get(a.tx_id, accessor)
    return tx.info(ctx.state.clock())


async def _tx_list(ctx: Context, a: TxListArgs) -> TxListOut:
    accessor = ctx.session.accessor if ctx.session is not None else None
    now = ctx.state.clock()
    txs = ctx.state.txs.listing(accessor, {a.status} if a.status else None)
    return TxListOut(transactions=[t.info(now) for t in txs])


async def _tx_abort(ctx: Context, a: TxStatusArgs) -> TxInfo:
    if ctx.session is None:
        raise PermissionDenied("tx_abort needs a session")
    tx = ctx.state.txs.abort(a.tx_id, ctx.session.accessor)
    ctx.state.record("tx.aborted", ctx, tx=tx.tx_id)
    await ctx.state.save_tx(tx)
    return tx.info(ctx.state.clock())


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
        run=_tx_status,
    ),
    ToolSpec(
        name="tx_list",
        title="List this session's transactions",
        description="This session's transactions, optionally filtered by status.",
        scope="admin",
        args=TxListArgs,
        out=TxListOut,
        run=_tx_list,
    ),
    ToolSpec(
        name="tx_abort",
        title="Abort a transaction",
        description="Abort one of this session's pending transactions.",
        scope="admin",
        args=TxStatusArgs,
        out=TxInfo,
        run=_tx_abort,
        read_only=False,
        idempotent=True,
    ),
)
