"""The one password generator: the MCP `generate_password` tool and `apm generate` both use it.

Rules:
- Characters come from `secrets` (the OS CSPRNG), never `random`.
- Every chosen character class appears at least once (rejection sampling keeps it uniform).
- Stdlib only: the CLI imports it without the broker.
"""

from __future__ import annotations

import secrets
import string

from .errors import InvalidParameters

SYMBOLS = "!#$%&()*+,-./:;<=>?@[]^_{|}~"
MIN_LENGTH = 8
MAX_LENGTH = 128
DEFAULT_LENGTH = 24


def generate_password(
    length: int = DEFAULT_LENGTH,
    *,
    lowercase: bool = True,
    uppercase: bool = True,
    digits: bool = True,
    symbols: bool = True,
) -> str:
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise InvalidParameters(
            f"length must be between {MIN_LENGTH} and {MAX_LENGTH}", data={"length": length}
        )
    classes = [
        c
        for on, c in (
            (lowercase, string.ascii_lowercase),
            (uppercase, string.ascii_uppercase),
            (digits, string.digits),
            (symbols, SYMBOLS),
        )
        if on
    ]
    if not classes:
        raise InvalidParameters("choose at least one character class")
    alphabet = "".join(classes)
    while True:
        value = "".join(secrets.choice(alphabet) for _ in range(length))
        if all(any(ch in c for ch in value) for c in classes):
            return value
