"""`audit.list` (owner or admin session) and `audit.verify` (anyone, vault unlocked)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker.core.rollback import Anchor
from broker.wire.errors import InternalError
from broker.wire.protocol import AuditListParams, AuditListResult, AuditVerifyResult, Empty

from .context import Context
from .operations import Rule, operation


def _after(record: dict[str, Any], since: datetime) -> bool:
    try:
        return datetime.fromisoformat(str(record.get("ts"))) >= since
    except ValueError:
        return False


@operation("audit.list", Rule(unlocked=True, scope="admin", audit="none"))
async def process_audit_list(ctx: Context, p: AuditListParams) -> AuditListResult:
    audit = ctx.state.audit
    if audit is None:
        raise InternalError("the audit log is not open")
    out: list[dict[str, Any]] = []
    last = 0
    for rec in audit.records():
        seq = rec.get("seq")
        if not isinstance(seq, int) or seq <= p.after_seq:
            continue
        last = max(last, seq)
        if p.since is not None and not _after(rec, p.since):
            continue
        if p.session is not None and rec.get("session") != p.session:
            continue
        if p.event is not None and rec.get("event") != p.event:
            continue
        out.append(rec)
    return AuditListResult(records=out[-p.limit :], last_seq=max(last, p.after_seq))


@operation("audit.verify", Rule(unlocked=True, audit="none"))
async def process_audit_verify(ctx: Context, p: Empty) -> AuditVerifyResult:
    audit = ctx.state.audit
    if audit is None:
        raise InternalError("the audit log is not open")
    ctx.state.rollback.integrity(audit)  # a log deleted or replaced is put back first
    audit.flush()  # a checkpoint still pending for the last records
    anchor = Anchor.of(ctx.state.cache.get())
    found = await ctx.state.io(audit.verify, (anchor.audit_seq, anchor.audit_hash))
    findings = [str(f) for f in found if not f.warning]
    count = sum(1 for _ in audit.records())
    return AuditVerifyResult(
        ok=not findings,
        records=count,
        findings=findings,
        warnings=[str(f) for f in found if f.warning],
    )
