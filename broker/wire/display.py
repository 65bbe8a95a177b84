"""Showing untrusted text to a person: the one escaper, and the one way to show a secret's value.

Everything an agent, a client or a vault entry can set (entry names, urls, notes, field values,
justifications, session labels, client names) reaches terminals, desktop notifications and
webhooks. A terminal obeys ESC/CSI sequences (erase line, move the cursor up: a fake approval
prompt), a C1 byte can start one on its own, and bidi overrides, isolates, line separators and
zero-width characters reorder or hide text in any renderer. `escape` turns every such character
into a visible escape, so what is shown is what is stored.

Rules:
- Standard library only: the CLI, the broker and the shim may all import it.
- `escape` output is one line of printable characters: nothing in it moves the cursor, changes
  colours, reorders text or hides characters. It is unambiguous: a literal backslash is `\\\\`.
- `secret_summary` never returns anything that lets a reader test guesses of the value offline.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

# A process-lifetime random key for fingerprints (see secret_summary). It never leaves memory.
_FINGERPRINT_KEY = os.urandom(32)

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


# str.isprintable() is False for Cc (C0, DEL, C1), Cf (bidi embeddings, overrides and
# isolates, LRM/RLM/ALM, zero-width space/joiners, BOM, invisible operators), Zl/Zp (U+2028,
# U+2029), Zs other than the ASCII space (NBSP and friends look like a space but are not),
# Cs (lone surrogates from surrogateescape), Co (private use) and Cn (unassigned): all escaped.
def escape(text: object, *, backslash: bool = True) -> str:
    """`text` (str() of it if not a string) with every character that is not plainly printable
    written as a visible escape: `\\x1b`, `\\u202e`, `\\n`, `\\\\` and so on.

    `backslash=False` leaves backslashes alone: for a line that may already hold escaped values
    (a preview), as a last net at a sink; it is idempotent, where the default is not."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable() and (not backslash or "\\" not in s):
        return s  # the common case costs one C-level scan
    return "".join(
        ch if ch.isprintable() and (not backslash or ch != "\\") else _escape_char(ch) for ch in s
    )


def fingerprint(value: str | bytes, key: bytes | None = None) -> str:
    """8 hex digits of HMAC-SHA256(key, value) (key: this process's random key)."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    return hmac.new(key or _FINGERPRINT_KEY, data, hashlib.sha256).hexdigest()[:8]


def secret_summary(value: str | bytes, key: bytes | None = None) -> str:
    """How a secret value is shown to a person: `<secret: 24 chars, fp 3f2a9c1b>`.

    The length says whether it looks like what was meant (a 4-character "API key" is not one);
    the fingerprint tells two values apart (the value previewed twice, or changed between two
    listings). Why a keyed hash: a plain hash, even truncated to 32 bits, is an offline oracle
    for low-entropy values (a PIN, a short password: guess, hash, compare). The key is random
    per process and never leaves memory, so a fingerprint is only comparable with others made
    by the same process (the broker, for approvals) and tells nothing to anyone without it.
    """
    n = len(value)
    unit = "chars" if isinstance(value, str) else "bytes"
    return f"<secret: {n} {unit}, fp {fingerprint(value, key)}>"


def args_lines(args: Mapping[str, Any], indent: str = "  ") -> list[str]:
    """Arguments as `key: value` lines, nested mappings indented, lists comma-joined; every
    key and value escaped, so one line of output is one line of input. Secret values are
    expected to arrive already replaced by `secret_summary`."""
    lines: list[str] = []
    for key, value in args.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}{escape(key)}:" + ("" if value else " {}"))
            lines += args_lines(value, indent + "  ")
        elif isinstance(value, list | tuple):
            lines.append(f"{indent}{escape(key)}: [{', '.join(escape(v) for v in value)}]")
        else:
            lines.append(f"{indent}{escape(key)}: {escape('null' if value is None else value)}")
    return lines
