"""Wire methods of the vault's storage: bulk add, online backup, and the v1 → v2 migration.

Rules:
- `entry.add_batch` is one commit whatever its size, with the same checks per item as
  `entry.add` (session filter included); refusals name the item's index, never its values.
- Backup and migrate are owner operations (the master password, proven now): one writes the
  vault to a path the caller names, the other deletes the v1 backups.
"""

from __future__ import annotations

from pathlib import Path

from broker.core.vault import Change, NewEntry
from broker.wire.errors import InvalidParameters, PermissionDenied
from broker.wire.protocol import (
    BatchRefusal,
    EntryBatchParams,
    EntryBatchResult,
    VaultBackupParams,
    VaultBackupResult,
    VaultMigrateParams,
    VaultMigrateResult,
)

from .context import Context
from .operations import OWNER, OWNER_CHANGE, WRITE, operation


@operation("entry.add_batch", WRITE)
async def process_entry_add_batch(ctx: Context, p: EntryBatchParams) -> EntryBatchResult:
    vault = ctx.state.cache.get()
    items: list[NewEntry] = []
    refused: list[BatchRefusal] = []
    outside: list[int] = []
    for i, e in enumerate(p.entries):
        if not ctx.allows(e.space, e.tags, e.name):
            outside.append(i)
            continue
        change = Change(
            fields=e.fields,
            secrets={k: v.value.get_secret_value() for k, v in e.secrets.items()},
            remove_fields=[],
        )
        items.append(NewEntry(e.type, e.name, e.space, e.tags, e.url, e.notes, change))
    if outside:
        if p.atomic:
            raise PermissionDenied(
                "this session may not create entries outside its entry filter",
                data={"index": outside[0]},
                hint="ask the owner for a session that covers this space, tag or name",
            )
        refused += [
            BatchRefusal(index=i, code=PermissionDenied.code, message="outside the entry filter")
            for i in outside
        ]
    # positions of the items passed to the vault, to report its refusals by batch index
    kept = [i for i in range(len(p.entries)) if i not in set(outside)]
    async with ctx.state.write_lock:
        try:
            added, failed = await ctx.state.io(lambda: vault.add_batch(items, atomic=p.atomic))
        except Exception as exc:
            data = getattr(exc, "data", None)
            if isinstance(data, dict) and isinstance(data.get("index"), int):
                data["index"] = kept[data["index"]]
            raise
    refused += [
        BatchRefusal(index=kept[i], code=exc.code, message=exc.message) for i, exc in failed
    ]
    refused.sort(key=lambda r: r.index)
    return EntryBatchResult(added=[e.id for e in added], refused=refused)


@operation("vault.backup", OWNER)
async def process_vault_backup(ctx: Context, p: VaultBackupParams) -> VaultBackupResult:
    vault = ctx.state.cache.get()
    directory = vault.path.parent / "backups"
    if p.name in (".", "..") or "/" in p.name:
        raise InvalidParameters("the backup name must be a plain file name", data={"field": "name"})

    def work() -> Path:
        directory.mkdir(mode=0o700, exist_ok=True)
        dest = directory / p.name
        vault.backup(dest)  # the online backup API: commits go on meanwhile
        return dest

    dest = await ctx.state.io(work)
    return VaultBackupResult(path=str(dest), size=dest.stat().st_size)


@operation("vault.migrate", OWNER_CHANGE)
async def process_vault_migrate(ctx: Context, p: VaultMigrateParams) -> VaultMigrateResult:
    vault = ctx.state.cache.get()
    removed: list[Path] = []
    if p.finish:
        async with ctx.state.write_lock:
            removed = await ctx.state.io(vault.finish_migration)
    return VaultMigrateResult(
        format=vault.format,
        generation=vault.generation,
        v1_backups=[str(x) for x in vault.v1_backups()],
        removed=[str(x) for x in removed],
    )
