"""Adding many entries at once: duplicate handling, the broker's batch method, a progress bar.

Importers and `apm env migrate` call `commit_entries`, the one path for bulk adds. It uses the
broker's `entry.add_batch` (all-or-nothing per chunk, one durable write) when the broker has
it, and falls back to one `entry.add` per entry when it answers "unknown method".

Rules:
- Duplicates are decided here, before anything is written: skip, rename ("name (2)") or
  overwrite (an edit of the existing entry of the same type; its old secrets go to history).
- Reasons in the summary never carry a value; only names and error codes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from broker.wire.entries import NAME_MAX, EntryMeta
from broker.wire.errors import ApmError, InvalidParameters, SpaceNotFound
from broker.wire.protocol import (
    Empty,
    EntryAddParams,
    EntryEditParams,
    EntryListParams,
    SpaceAddParams,
)

from .client import BrokerClient

OnDuplicate = Literal["skip", "rename", "overwrite"]
BATCH_METHOD = "entry.add_batch"
CHUNK_BYTES = 512 * 1024  # well under the broker's 1 MiB frame cap
CHUNK_ENTRIES = 500
PROGRESS_MIN = 50  # a bar only for imports at least this big
# errors about the caller or the broker, not the entry: stop at the first instead of N failures
FATAL = frozenset(
    {
        "PERMISSION_DENIED",
        "SESSION_REQUIRED",
        "VAULT_LOCKED",
        "BAD_PASSWORD",
        "BROKER_UNAVAILABLE",
        "STORAGE_ERROR",
    }
)


@dataclass
class Summary:
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old, new)
    overwritten: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    used_batch: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "renamed": [{"from": a, "to": b} for a, b in self.renamed],
            "overwritten": self.overwritten,
            "failed": [{"name": n, "reason": r} for n, r in self.failed],
            "batch": self.used_batch,
        }


class Progress:
    """A one-line bar on stderr, only when stderr is a terminal and the job is big."""

    def __init__(self, total: int, label: str = "importing") -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.on = total >= PROGRESS_MIN and sys.stderr.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.on:
            width = 30
            filled = width * self.done // max(self.total, 1)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")


def _existing(
    client: BrokerClient, creds: dict[str, Any], spaces: set[str]
) -> dict[tuple[str, str], EntryMeta]:
    out: dict[tuple[str, str], EntryMeta] = {}
    for space in sorted(spaces):
        got: list[EntryMeta] = []
        while True:
            try:
                res = client.call(
                    "entry.list",
                    EntryListParams(space=space, offset=len(got), limit=1000),
                    **creds,
                )
            except SpaceNotFound:
                break
            got.extend(res.entries)
            if not res.entries or len(got) >= res.total:
                break
        out.update({(e.space, e.name): e for e in got})
    return out


def ensure_spaces(client: BrokerClient, creds: dict[str, Any], spaces: set[str]) -> list[str]:
    res = client.call("space.list", Empty(), **creds)
    have = {s.name for s in res.spaces}
    made = []
    for space in sorted(spaces - have):
        client.call("space.add", SpaceAddParams(name=space), **creds)
        made.append(space)
    return made


def _renamed(name: str, taken: set[str]) -> str:
    n = 2
    while True:
        suffix = f" ({n})"
        candidate = name[: NAME_MAX - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def _chunks(items: Sequence[EntryAddParams]) -> list[list[EntryAddParams]]:
    out: list[list[EntryAddParams]] = []
    cur: list[EntryAddParams] = []
    size = 0
    for p in items:
        n = len(p.model_dump_json(context={"reveal": True}))
        if cur and (size + n > CHUNK_BYTES or len(cur) >= CHUNK_ENTRIES):
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append(cur)
    return out


class _Refused(Exception):
    pass


def _add_batch(
    client: BrokerClient, creds: dict[str, Any], chunk: list[EntryAddParams]
) -> list[tuple[int, str]] | None:
    """Send one chunk to `entry.add_batch`; return the refused items as (index, code), or
    None when the broker does not have the method.

    The contract (storage's): params {"entries": [EntryAddParams...], "atomic": false};
    result {"added": [ids], "refused": [{"index", "code", "message"}]} — one commit, and a
    refused item does not stop the others.
    """
    payload = {
        "entries": [json.loads(p.model_dump_json(context={"reveal": True})) for p in chunk],
        "atomic": False,
    }
    try:
        raw = client.call_raw(BATCH_METHOD, payload, **creds)
    except InvalidParameters as exc:
        if exc.message == "unknown method" or exc.data.get("method") == BATCH_METHOD:
            return None
        raise _Refused() from exc  # the chunk as a whole was refused: try item by item
    refused = raw.get("refused") or []
    return [
        (int(r["index"]), str(r.get("code") or "REFUSED"))
        for r in refused
        if isinstance(r, dict) and isinstance(r.get("index"), int)
    ]


def commit_entries(
    client: BrokerClient,
    creds: dict[str, Any],
    items: Sequence[EntryAddParams],
    on_duplicate: OnDuplicate = "skip",
    *,
    summary: Summary | None = None,
    label: str = "importing",
) -> Summary:
    summary = summary or Summary()
    spaces = {p.space for p in items}
    ensure_spaces(client, creds, spaces)
    existing = _existing(client, creds, spaces)
    taken: dict[str, set[str]] = {key: set() for key in spaces}
    for space, name in existing:
        taken[space].add(name)
    to_add: list[EntryAddParams] = []
    progress = Progress(len(items), label)
    for p in items:
        key = (p.space, p.name)
        if key not in existing and p.name not in taken[p.space]:
            taken[p.space].add(p.name)
            to_add.append(p)
            continue
        if on_duplicate == "skip":
            summary.skipped.append((p.name, "an entry with this name exists"))
            progress.advance()
        elif on_duplicate == "rename":
            new = _renamed(p.name, taken[p.space])
            taken[p.space].add(new)
            summary.renamed.append((p.name, new))
            to_add.append(p.model_copy(update={"name": new}))
        else:
            old = existing.get(key)
            if old is None:  # a name repeated inside the import itself
                summary.skipped.append((p.name, "the import holds this name twice"))
            elif old.type != p.type:
                summary.failed.append((p.name, f"exists with type {old.type}, not {p.type}"))
            else:
                try:
                    client.call(
                        "entry.edit",
                        EntryEditParams(
                            ref=old.id,
                            expect_updated_at=old.updated_at,
                            url=p.url,
                            notes=p.notes,
                            add_tags=p.tags,
                            fields=p.fields,
                            secrets=p.secrets,
                        ),
                        **creds,
                    )
                    summary.overwritten.append(p.name)
                except ApmError as exc:
                    summary.failed.append((p.name, exc.code))
            progress.advance()
    renamed_to = {new for _, new in summary.renamed}
    batch_ok = True  # until the broker says it has no batch method
    for chunk in _chunks(to_add):
        refusals = None
        if batch_ok:
            try:
                refusals = _add_batch(client, creds, chunk)
                batch_ok = refusals is not None
            except _Refused:
                pass
        if refusals is not None:
            summary.used_batch = True
            bad = dict(refusals)
            for i, p in enumerate(chunk):
                if i in bad:
                    summary.failed.append((p.name, bad[i]))
                    summary.renamed = [(a, b) for a, b in summary.renamed if b != p.name]
                elif p.name not in renamed_to:
                    summary.added.append(p.name)
            progress.advance(len(chunk))
            continue
        for p in chunk:
            try:
                client.call("entry.add", p, **creds)
                if p.name not in renamed_to:
                    summary.added.append(p.name)
            except ApmError as exc:
                if exc.code in FATAL:
                    progress.close()
                    raise
                summary.failed.append((p.name, exc.code))
                summary.renamed = [(a, b) for a, b in summary.renamed if b != p.name]
            progress.advance()
    progress.close()
    return summary


def print_summary(summary: Summary, *, dry_run: bool = False) -> None:
    """Counts and names on stderr; never a value."""
    w = sys.stderr.write
    verb = "would add" if dry_run else "added"
    w(
        f"apm: {verb} {len(summary.added) + len(summary.renamed)}, "
        f"overwrote {len(summary.overwritten)}, skipped {len(summary.skipped)}, "
        f"renamed {len(summary.renamed)}, failed {len(summary.failed)}\n"
    )
    for a, b in summary.renamed:
        w(f"  renamed: {a!r} -> {b!r}\n")
    for n, r in summary.skipped:
        w(f"  skipped: {n!r}: {r}\n")
    for n, r in summary.failed:
        w(f"  failed:  {n!r}: {r}\n")
