"""Just-in-time access: an agent asks for one entry, the person decides, a grant expires.

Rules:
- One entry per request (optionally one field); no bundles.
- A session sees only its own requests.
- A grant gives that session, for that entry (and field, if named), until its expiry: the
  secrets-scope reads of that entry and resolution through `apm run`. Expiry and revocation
  take effect at the next call (every use re-checks against the injected clock).
- Requests hold no secret: entry id and name, field name, justification, times, decisions.
- A grant has a kind: `use` (the default) lets the session's references resolve (`apm run`,
  `apm://`) and nothing more; `reveal` also lets the value reach the model (`decrypt_entry`,
  `get_totp`). A request asks for one; the approver may turn `reveal` down to `use`, never up.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel

from broker.wire.errors import InvalidParameters, RequestClosed, RequestNotFound
from broker.wire.protocol import AccessRequestFields
from broker.wire.protocol import GrantKind as GrantKind  # re-exported

RequestState = Literal["pending", "approved", "denied", "expired", "revoked"]
# a shown field (protocol.AccessRequestFields) whose stored name differs
_STORED_AS = {"entry": "entry_name"}
PENDING_TTL = timedelta(hours=24)


class AccessRequest(BaseModel):
    id: str
    accessor: str
    label: str = ""
    entry_id: str
    entry_name: str
    space: str
    field: str | None = None
    main_field: str | None = None  # the entry's main secret field, for references
    minutes: int
    justification: str
    # records stored before grant kinds existed load as `use`: the narrower reading
    access: GrantKind = "use"
    state: RequestState = "pending"
    created_at: datetime
    decided_at: datetime | None = None
    expires_at: datetime | None = None  # the grant's end, once approved
    reason: str | None = None

    def status(self, now: datetime) -> str:
        if self.state == "pending" and now >= self.created_at + PENDING_TTL:
            return "expired"
        if self.state == "approved" and self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return self.state

    def shown(self, now: datetime) -> dict[str, Any]:
        """The values of `protocol.AccessRequestFields`, by name: what the wire view and the
        MCP tool view of this request both show, read here only (no field-by-field copies)."""
        values = {n: getattr(self, _STORED_AS.get(n, n)) for n in AccessRequestFields.model_fields}
        values["state"] = self.status(now)  # the stored state with expiry applied
        return values

    def reference(self) -> str:
        return f"apm://{self.space}/{self.entry_name}/{self.field or self.main_field or '-'}"


class RequestStore:
    def __init__(self, records: list[dict[str, Any]], clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.records: dict[str, AccessRequest] = {}
        for raw in records:
            r = AccessRequest.model_validate(raw)
            self.records[r.id] = r

    def dump(self) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in self.records.values()]

    def create(self, **kw: Any) -> AccessRequest:
        req = AccessRequest(id="req_" + secrets.token_hex(8), created_at=self.clock(), **kw)
        self.records[req.id] = req
        return req

    def discard(self, req_id: str) -> None:
        self.records.pop(req_id, None)

    def get(self, req_id: str, accessor: str | None) -> AccessRequest:
        req = self.records.get(req_id)
        if req is None or (accessor is not None and req.accessor != accessor):
            raise RequestNotFound(data={"request": req_id[:64]})
        return req

    def decide(
        self,
        req_id: str,
        approve: bool,
        minutes: int | None,
        reason: str | None,
        max_minutes: int,
        use_only: bool = False,
    ) -> AccessRequest:
        req = self.get(req_id, None)
        now = self.clock()
        status = req.status(now)
        if status != "pending":
            raise RequestClosed(f"request is {status}", data={"request": req_id})
        m = minutes if minutes is not None else req.minutes
        if approve and not 1 <= m <= max_minutes:  # before anything changes
            raise InvalidParameters(f"duration must be 1..{max_minutes} minutes")
        req.decided_at = now
        req.reason = reason
        if approve:
            req.minutes = m
            if use_only:
                req.access = "use"
            req.state = "approved"
            req.expires_at = now + timedelta(minutes=m)
        else:
            req.state = "denied"
        return req

    def revoke(self, req_id: str) -> AccessRequest:
        req = self.get(req_id, None)
        if req.status(self.clock()) not in ("pending", "approved"):
            raise RequestClosed(f"request is {req.status(self.clock())}", data={"request": req_id})
        req.state = "revoked"
        req.decided_at = self.clock()
        return req

    def grant(
        self,
        accessor: str,
        entry_id: str,
        field: str,
        *,
        named_only: bool = False,
    ) -> AccessRequest | None:
        """The live grant covering `field` of `entry_id` for `accessor`, if any; a `reveal`
        grant first (it covers `use` too). The caller checks the kind it needs.

        A request without a field covers every field of the entry; one with a field covers it
        alone. `named_only`: only a request that named `field` itself covers it (a TOTP seed:
        the person approved the seed, not just codes).
        """
        now = self.clock()
        found: AccessRequest | None = None
        for r in self.records.values():
            if (
                r.accessor == accessor
                and r.entry_id == entry_id
                and r.status(now) == "approved"
                and (r.field == field or (r.field is None and not named_only))
            ):
                if r.access == "reveal":
                    return r
                found = r
        return found

    def listing(self, accessor: str | None, pending_only: bool = False) -> list[AccessRequest]:
        now = self.clock()
        out = [
            r
            for r in self.records.values()
            if (accessor is None or r.accessor == accessor)
            and (not pending_only or r.status(now) == "pending")
        ]
        return sorted(out, key=lambda r: r.created_at)
