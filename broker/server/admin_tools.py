"""Admin-scope tools: the audit log, an entry's history, the vault's KDF profile. Each runs one
operation of `tool_operations`; the gate checks its rule (admin scope, no entry filter)."""

from __future__ import annotations

from .tool_base import ToolSpec
from .tool_operations import (
    AuditArgs,
    AuditOut,
    HistoryArgs,
    HistoryOut,
    ProfilesArgs,
    ProfilesOut,
)

ADMIN_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="get_audit_logs",
        title="Read the audit log",
        description=(
            "Records of the tamper-evident audit log (never secret values), filtered by time, "
            "event, session or entry, paged with after_seq/limit."
        ),
        scope="admin",
        args=AuditArgs,
        out=AuditOut,
        op="audit.search",
    ),
    ToolSpec(
        name="get_history",
        title="An entry's history",
        description="An entry's secret versions (values masked) and the audit events about it.",
        scope="admin",
        args=HistoryArgs,
        out=HistoryOut,
        op="entry.versions",
    ),
    ToolSpec(
        name="manage_profiles",
        title="The vault's key-derivation profile",
        description=(
            "Show the vault's Argon2id profile. Changing it is an owner operation done with "
            "`apm profile set` in a terminal."
        ),
        scope="admin",
        args=ProfilesArgs,
        out=ProfilesOut,
        op="profile.manage",
    ),
)
