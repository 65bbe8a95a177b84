"""The wire's size limits and name patterns, stdlib only so a one-shot CLI can check them early.

`entries` and `protocol` build their pydantic fields from these; the CLI's lean path
(broker/cli/oneshot.py) checks the same values without importing pydantic.
"""

from __future__ import annotations

NAME_MAX = 200
FIELD_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
VALUE_MAX = 64 * 1024
TAG_MAX = 64
SPACE_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
DEFAULT_SPACE = "default"
RESOLVE_REFS_MAX = 64  # SecretResolveParams.refs
