"""Broker calls made without pydantic, for the lean one-shot path (`oneshot`: `apm get`,
`apm totp`) and `apm run` (`run_cmd`): requests are plain dicts checked as their models check
them, results are read key by key. Imports neither pydantic nor a command module.
"""

from __future__ import annotations

from typing import Any

from broker.wire.errors import InternalError, InvalidParameters
from broker.wire.limits import RESOLVE_REFS_MAX

from .auth import Credentials
from .client import BrokerClient

INVALID_HINT = 'see "apm COMMAND --help"'


def invalid(bad: list[str]) -> InvalidParameters:
    """What the full path says for a pydantic ValidationError on these fields."""
    return InvalidParameters(f"invalid value for {', '.join(sorted(set(bad)))}", hint=INVALID_HINT)


def result_field(result: dict[str, Any], key: str, kind: type) -> Any:
    value = result.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InternalError(f"broker sent a result without {key!r}")
    return value


def resolve_refs(refs: list[str], who: Credentials) -> dict[str, str]:
    """secret.resolve for `apm run`: {ref: value}, with the session or the owner's password."""
    if not 1 <= len(refs) <= RESOLVE_REFS_MAX:
        raise invalid(["refs"])
    with BrokerClient() as c:
        res = c.call_raw("secret.resolve", {"refs": refs}, **who.creds())
    secrets = res.get("secrets")
    if not isinstance(secrets, list):
        raise InternalError("broker sent a result without 'secrets'")
    return {result_field(s, "ref", str): result_field(s, "value", str) for s in secrets}
