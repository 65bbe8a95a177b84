"""Rendering results for people (tables, key: value) and for scripts (`--json`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from broker.wire.entries import EntryMeta


def emit_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = json.loads(value.model_dump_json())
    elif isinstance(value, list):
        value = [json.loads(v.model_dump_json()) if isinstance(v, BaseModel) else v for v in value]
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    sys.stdout.write("\n".join(lines) + "\n")


def entry_row(e: EntryMeta) -> list[str]:
    user = e.fields.get("username") or e.fields.get("user") or e.fields.get("account")
    who = (user.value or "") if user is not None else ""
    return [e.name, e.type, e.space, ",".join(e.tags), who or (e.url or "")]


ENTRY_HEADERS = ("NAME", "TYPE", "SPACE", "TAGS", "USER/URL")


def entry_details(e: EntryMeta) -> None:
    out = [
        f"name:     {e.name}",
        f"id:       {e.id}",
        f"type:     {e.type}",
        f"space:    {e.space}",
    ]
    if e.tags:
        out.append(f"tags:     {', '.join(e.tags)}")
    if e.url:
        out.append(f"url:      {e.url}")
    if e.notes:
        out.append(f"notes:    {e.notes}")
    out.append(f"created:  {e.created_at.isoformat(timespec='seconds')}")
    out.append(f"updated:  {e.updated_at.isoformat(timespec='seconds')}")
    if e.fields:
        out.append("fields:")
        for name, f in e.fields.items():
            if f.secret:
                extra = f" ({f.history} previous)" if f.history else ""
                out.append(f"  {name}: <secret: apm get {e.name} --field {name}>{extra}")
            else:
                out.append(f"  {name}: {f.value}")
    sys.stdout.write("\n".join(out) + "\n")


def info(message: str) -> None:
    """Progress and confirmations go to stderr so stdout stays clean for values and JSON."""
    sys.stderr.write(f"apm: {message}\n")
