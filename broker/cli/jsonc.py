"""JSON with comments and trailing commas (VS Code's mcp.json), edited in place.

A client's config file is the person's: `apm mcp install` changes one member
(`servers.apm`, `mcpServers.apm`) and leaves every other byte as it was, comments included.
How: `blank` turns comments and trailing commas into spaces (same length, newlines kept), so
the stdlib parser reads the text and every offset in it is an offset in the original; the new
member's text is spliced in at those offsets.

Rules:
- A file that is not JSONC is refused with its line and column and the parser's reason.
- Only the named member is replaced, inserted or removed; nothing else is reformatted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_WS = " \t\r\n"


class JsoncError(ValueError):
    def __init__(self, why: str, line: int, column: int) -> None:
        super().__init__(f"line {line}, column {column}: {why}")
        self.why, self.line, self.column = why, line, column


def blank(text: str) -> str:
    """`text` with comments and trailing commas replaced by spaces (newlines kept)."""
    out = list(text)
    i, n = 0, len(text)
    last_comma: int | None = None  # a comma not yet followed by a value
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            last_comma = None
            continue
        if c == "/" and i + 1 < n and text[i + 1] in "/*":
            end = text.find("\n", i) if text[i + 1] == "/" else text.find("*/", i + 2)
            end = n if end == -1 else (end if text[i + 1] == "/" else end + 2)
            for k in range(i, end):
                if out[k] != "\n":
                    out[k] = " "
            i = end
            continue
        if c == ",":
            last_comma = i
        elif c in "}]":
            if last_comma is not None:
                out[last_comma] = " "
            last_comma = None
        elif c not in _WS:
            last_comma = None
        i += 1
    return "".join(out)


def _position(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def parse(text: str) -> Any:
    """The document; raises JsoncError naming the line and column."""
    clean = blank(text)
    if not clean.strip():
        return {}
    try:
        return json.loads(clean)
    except json.JSONDecodeError as exc:
        raise JsoncError(exc.msg, exc.lineno, exc.colno) from exc


@dataclass
class Member:
    key: str
    start: int  # the key's opening quote
    value_start: int
    value_end: int


def _skip(clean: str, i: int) -> int:
    while i < len(clean) and clean[i] in _WS:
        i += 1
    return i


def _members(clean: str, obj: int) -> tuple[list[Member], int]:
    """The members of the object whose `{` is at `obj`, and the offset of its `}`."""
    decoder = json.JSONDecoder()
    out: list[Member] = []
    i = _skip(clean, obj + 1)
    while clean[i] != "}":
        key, after = decoder.raw_decode(clean, i)
        j = _skip(clean, after)
        v = _skip(clean, j + 1)  # past ':'
        _, end = decoder.raw_decode(clean, v)
        out.append(Member(key, i, v, end))
        i = _skip(clean, end)
        if clean[i] == ",":
            i = _skip(clean, i + 1)
    return out, i


def _indent_of(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    line = text[start:pos]
    return line[: len(line) - len(line.lstrip())]


def _render(value: Any, indent: str) -> str:
    return json.dumps(value, indent=2).replace("\n", "\n" + indent)


def _comma_after(text: str, clean: str, pos: int) -> int | None:
    """The offset of the comma after a value ending at `pos` (a trailing one too), if any."""
    while pos < len(clean) and clean[pos] in _WS:
        if text[pos] == ",":  # blanked in `clean`: a trailing comma
            return pos
        pos += 1
    return pos if pos < len(clean) and clean[pos] == "," else None


def _line_start(text: str, pos: int) -> int:
    """Where the line holding `pos` starts, if only whitespace precedes `pos` on it."""
    start = text.rfind("\n", 0, pos)
    return start if start != -1 and not text[start + 1 : pos].strip() else pos


def _insert(text: str, clean: str, obj: int, key: str, value: Any) -> str:
    members, close = _members(clean, obj)
    if not members:
        outer = _indent_of(text, obj)
        inner = outer + "  "
        piece = f"\n{inner}{json.dumps(key)}: {_render(value, inner)}\n{outer}"
        return text[: obj + 1] + piece + text[close:]
    last = members[-1]
    inner = _indent_of(text, last.start)
    comma = _comma_after(text, clean, last.value_end)
    pos = comma + 1 if comma is not None else last.value_end
    eol = text.find("\n", pos)
    rest = text[pos:eol].strip() if eol != -1 and eol < close else "x"
    at = eol if rest == "" or (rest.startswith("//") and not clean[pos:eol].strip()) else pos
    trailing = "," if comma is not None and clean[comma] != "," else ""  # keep the file's style
    piece = f"\n{inner}{json.dumps(key)}: {_render(value, inner)}{trailing}"
    out = text[:at] + piece + text[at:]
    if comma is None:  # the member before needs a comma now (before any comment on its line)
        out = out[: last.value_end] + "," + out[last.value_end :]
    return out


def set_member(text: str, parent: str, key: str, value: Any | None) -> str:
    """`text` with `<parent>.<key>` set to `value` (None: removed), all else unchanged.

    The document must be an object; `parent` is created when missing.
    """
    if not text.strip():
        return json.dumps({parent: {key: value}} if value is not None else {}, indent=2) + "\n"
    clean = blank(text)
    top = _skip(clean, 0)
    if clean[top] != "{":
        line, col = _position(text, top)
        raise JsoncError("the file does not hold a JSON object", line, col)
    members, _ = _members(clean, top)
    holder = next((m for m in members if m.key == parent), None)
    if holder is None:
        return text if value is None else _insert(text, clean, top, parent, {key: value})
    if clean[holder.value_start] != "{":
        line, col = _position(text, holder.value_start)
        raise JsoncError(f"{parent!r} is not an object", line, col)
    inside, close = _members(clean, holder.value_start)
    mine = next((m for m in inside if m.key == key), None)
    if value is not None and mine is not None:
        indent = _indent_of(text, mine.start)
        return text[: mine.value_start] + _render(value, indent) + text[mine.value_end :]
    if value is not None:
        return _insert(text, clean, holder.value_start, key, value)
    if mine is None:
        return text
    if len(inside) == 1:  # the only member: the object becomes empty
        return text[: holder.value_start + 1] + text[close:]
    comma = _comma_after(text, clean, mine.value_end)
    start = _line_start(text, mine.start)
    if comma is not None:  # the comma after it goes with it
        return text[:start] + text[comma + 1 :]
    out = text[:start] + text[mine.value_end :]
    k = len(clean[: mine.start].rstrip(_WS))
    if k > 0 and clean[k - 1] == ",":  # the last member: the comma before it goes
        out = out[: k - 1] + out[k:]
    return out
