"""Rendering results for people (tables, key: value) and for scripts (`--json`).

Rules:
- Text for people goes through `escape` (broker.wire.display): every value that an agent, a
  client or an entry can set is escaped where it is formatted, and every line is escaped once
  more on its way out (`write_lines`, `table`, `info`), so a control character never reaches
  the terminal even from a value someone forgot to escape.
- `--json` output is json.dumps with ensure_ascii: control and non-ASCII characters leave as
  `\\uXXXX` escapes, so a script printing raw JSON is safe too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from broker.wire.display import escape
from broker.wire.entries import EntryMeta


def emit_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = json.loads(value.model_dump_json())
    elif isinstance(value, list):
        value = [json.loads(v.model_dump_json()) if isinstance(v, BaseModel) else v for v in value]
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_lines(text: Sequence[str]) -> None:
    """Lines for people on stdout; each gets the last-net escape (backslashes kept, so values
    escaped when they were formatted are not escaped twice)."""
    sys.stdout.write("".join(escape(line, backslash=False) + "\n" for line in text))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    rows = [[escape(cell) for cell in row] for row in rows]
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
    return [e.name, e.type, e.space, ",".join(e.tags), who or (e.url or "")]  # table escapes


ENTRY_HEADERS = ("NAME", "TYPE", "SPACE", "TAGS", "USER/URL")


def entry_details(e: EntryMeta) -> None:
    out = [
        f"name:     {escape(e.name)}",
        f"id:       {e.id}",
        f"type:     {e.type}",
        f"space:    {e.space}",
    ]
    if e.tags:
        out.append(f"tags:     {', '.join(escape(t) for t in e.tags)}")
    if e.url:
        out.append(f"url:      {escape(e.url)}")
    if e.notes:
        out.append(f"notes:    {escape(e.notes)}")
    out.append(f"created:  {e.created_at.isoformat(timespec='seconds')}")
    out.append(f"updated:  {e.updated_at.isoformat(timespec='seconds')}")
    if e.fields:
        out.append("fields:")
        for name, f in e.fields.items():
            if f.secret:
                extra = f" ({f.history} previous)" if f.history else ""
                out.append(
                    f"  {escape(name)}: <secret: apm get {escape(e.name)} --field {escape(name)}>"
                    + extra
                )
            else:
                out.append(f"  {escape(name)}: {escape(f.value)}")
    write_lines(out)


def info(message: str) -> None:
    """Progress and confirmations go to stderr so stdout stays clean for values and JSON."""
    sys.stderr.write(f"apm: {escape(message, backslash=False)}\n")
