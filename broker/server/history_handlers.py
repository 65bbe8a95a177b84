"""`entry.history` and `entry.restore`: an entry's previous secret values, listed and brought back.

Rules:
- Listing is masked and needs the admin scope (as the get_history tool); `reveal` and
  `restore` need the owner's master password, verified now.
- A restore is an edit: the current value becomes version 1 of the history, nothing is lost.
"""

from __future__ import annotations

from pydantic import SecretStr

from broker.core.vault import Change
from broker.wire.errors import PermissionDenied
from broker.wire.protocol import (
    EntryHistoryParams,
    EntryHistoryResult,
    EntryRestoreParams,
    EntryResult,
    SecretVersion,
)

from .context import Context
from .operations import ADMIN, OWNER_CHANGE, operation


@operation("entry.history", ADMIN)
async def process_entry_history(ctx: Context, p: EntryHistoryParams) -> EntryHistoryResult:
    if p.reveal and not ctx.owner_proven:
        raise PermissionDenied(
            "previous values are shown to the owner only",
            hint='run "apm history NAME --reveal" yourself, without APM_EPHEMERAL_ID set',
        )
    vault = ctx.state.cache.get()
    entry = vault.resolve(p.ref, p.space, ctx.visible)
    versions: list[SecretVersion] = []
    for name, f in entry.fields.items():
        if not f.secret:
            continue
        current = vault.reveal(entry, name)[1] if p.reveal else None
        versions.append(
            SecretVersion(
                field=name,
                version=0,
                replaced_at=None,
                value=SecretStr(current) if current is not None else None,
            )
        )
        for n, h in enumerate(f.history, start=1):
            old = vault.previous(entry, name, n) if p.reveal else None
            versions.append(
                SecretVersion(
                    field=name,
                    version=n,
                    replaced_at=h.replaced_at,
                    value=SecretStr(old) if old is not None else None,
                )
            )
    return EntryHistoryResult(id=entry.id, name=entry.name, versions=versions)


@operation("entry.restore", OWNER_CHANGE)
async def process_entry_restore(ctx: Context, p: EntryRestoreParams) -> EntryResult:
    vault = ctx.state.cache.get()
    async with ctx.state.write_lock:
        entry = vault.resolve(p.ref, p.space, ctx.visible)
        field = p.field or vault.default_field(entry)
        value = vault.previous(entry, field, p.version)
        change = Change(fields={}, secrets={field: value}, remove_fields=[])
        updated = await ctx.state.io(
            lambda: vault.edit(
                entry,
                new_name=None,
                move_to=None,
                add_tags=[],
                remove_tags=[],
                url=None,
                notes=None,
                change=change,
            )
        )
    return EntryResult(entry=updated.meta())
