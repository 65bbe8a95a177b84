"""Entry types and the metadata view of an entry that crosses the wire.

Rules:
- `EntryMeta` never carries a secret value; secret fields show only that they are set.
- The field specs here are the single source for which fields are secret.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from .limits import DEFAULT_SPACE as DEFAULT_SPACE  # re-exported: entries has always named them
from .limits import FIELD_NAME_PATTERN as FIELD_NAME_PATTERN
from .limits import NAME_MAX as NAME_MAX
from .limits import SPACE_PATTERN as SPACE_PATTERN
from .limits import TAG_MAX as TAG_MAX
from .limits import VALUE_MAX as VALUE_MAX

# a type's name: one of ENTRY_TYPE_NAMES, or one an enabled `entry_type.NAME` plugin adds
# (broker/plugin_registry.py); the wire checks its shape, the vault whether it is known
ENTRY_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
EntryType = Annotated[str, Field(pattern=ENTRY_TYPE_PATTERN)]
ENTRY_TYPE_NAMES: tuple[str, ...] = (
    "login",
    "totp",
    "api_key",
    "token",
    "ssh_key",
    "database",
    "note",
    "custom",
)


class FieldSpec(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
    name: str
    secret: bool = False
    required: bool = False
    multiline: bool = False  # read until EOF at a prompt (keys, notes), not one line


class TypeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
    name: str
    fields: tuple[FieldSpec, ...]
    primary: str | None  # the field `apm get` prints by default
    free_fields: bool = False  # custom: any named field


def _f(
    name: str, *, secret: bool = False, required: bool = False, multiline: bool = False
) -> FieldSpec:
    return FieldSpec(name=name, secret=secret, required=required, multiline=multiline)


ENTRY_TYPES: dict[str, TypeSpec] = {
    "login": TypeSpec(
        name="login",
        fields=(_f("username"), _f("password", secret=True, required=True)),
        primary="password",
    ),
    "totp": TypeSpec(
        name="totp",
        fields=(
            _f("secret", secret=True, required=True),
            _f("issuer"),
            _f("account"),
            _f("digits"),
            _f("period"),
            _f("algorithm"),
        ),
        primary="secret",
    ),
    "api_key": TypeSpec(
        name="api_key",
        fields=(_f("key", secret=True, required=True), _f("service"), _f("key_id")),
        primary="key",
    ),
    "token": TypeSpec(
        name="token",
        fields=(_f("token", secret=True, required=True), _f("service"), _f("expires")),
        primary="token",
    ),
    "ssh_key": TypeSpec(
        name="ssh_key",
        fields=(
            _f("private_key", secret=True, required=True, multiline=True),
            _f("public_key"),
            _f("passphrase", secret=True),
        ),
        primary="private_key",
    ),
    "database": TypeSpec(
        name="database",
        fields=(
            _f("host"),
            _f("port"),
            _f("user"),
            _f("database"),
            _f("password", secret=True, required=True),
        ),
        primary="password",
    ),
    "note": TypeSpec(
        name="note",
        fields=(_f("content", secret=True, required=True, multiline=True),),
        primary="content",
    ),
    "custom": TypeSpec(name="custom", fields=(), primary=None, free_fields=True),
}


# the built-ins as their apm.plugins entry points name them (entry_type.login = ...:LOGIN)
LOGIN, TOTP, API_KEY, TOKEN, SSH_KEY, DATABASE, NOTE, CUSTOM = (
    ENTRY_TYPES[n] for n in ENTRY_TYPE_NAMES
)


class FieldMeta(BaseModel):
    model_config = ConfigDict(defer_build=True)

    secret: bool
    value: str | None = None  # only for non-secret fields
    history: int = 0  # number of previous secret values kept


class EntryMeta(BaseModel):
    model_config = ConfigDict(defer_build=True)

    id: str
    name: str
    type: EntryType
    space: str
    tags: list[str] = Field(default_factory=list)
    url: str | None = None
    notes: str | None = None
    fields: dict[str, FieldMeta] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
