"""What a person is shown to decide on a transaction: its exact stored arguments, with every
secret value replaced by its length and a keyed fingerprint (broker.wire.display).

Rules:
- Built from the stored, normalised parameters the commit will execute, never from the
  agent's own preview text: the approval shows what will run.
- No secret value leaves this module: SecretStr becomes `secret_summary`, computed here in the
  broker with the broker process's fingerprint key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

from broker.wire.display import args_lines, secret_summary


def shown_value(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return secret_summary(value.get_secret_value())
    if isinstance(value, BaseModel):
        fields = shown_args(value)
        # {"value": <secret>} (SecretValue) reads better as the secret alone
        return fields["value"] if list(fields) == ["value"] else fields
    if isinstance(value, dict):
        return {str(k): shown_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [shown_value(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def shown_args(params: BaseModel) -> dict[str, Any]:
    """Every field of the stored model that holds something: None and empty lists or maps
    (nothing to add, remove or set) are left out; defaults that act (space "default",
    force false) are shown."""
    out: dict[str, Any] = {}
    for name in type(params).model_fields:
        value = getattr(params, name)
        if value is None or (isinstance(value, list | dict | tuple | set) and not value):
            continue
        out[name] = shown_value(value)
    return out


def approval_lines(method: str, params: BaseModel) -> list[str]:
    """`runs <method> with:` and the argument lines, escaped, for a terminal or a client."""
    return [f"runs {method} with:", *args_lines(shown_args(params))]
