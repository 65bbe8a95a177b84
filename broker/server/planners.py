"""What a change will do, before it is made: the write tools' arguments and the planners that
validate them against the open vault and build the pinned wire params and the preview.

Both ways a change is previewed use these: a write tool's preview (proposals.propose, which
hands the plan to the gate as a `Proposal`) and the gate holding a session's wire change
(approval.hold). This module sits below the gate (`dispatch`): it reads the vault through the
context and never runs an operation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr

from broker.plugin_registry import entry_type
from broker.wire.display import escape
from broker.wire.entries import (
    SPACE_PATTERN,
    EntryType,
)
from broker.wire.errors import (
    EntryNotFound,
    InvalidParameters,
    PermissionDenied,
    SpaceNotFound,
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
)

from .context import Context

# the wire's limits, published in the tools' input schemas: a refused value names the tool's
# own field (`secrets.password`), never a wire model's
from .tool_args import Args, Fields, Name, Space, Tags, Url, Value

MASK = "********"


class TxArgs(Args):
    tx_id: str | None = Field(default=None, max_length=64, description="commit this preview")
    approve: bool = Field(default=False, description="with tx_id: execute the previewed change")


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


@dataclass(frozen=True)
class Proposal:
    """A change an MCP tool previews (`dispatch.invoke(..., proposal=)`): the gate makes it a
    pending transaction, whatever the session's policy (tools are two-phase); nothing runs."""

    tool: str
    plan: Plan
    raw_args: dict[str, Any]  # the preview call's arguments, to compare a commit call's with


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
