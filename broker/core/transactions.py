"""Two-phase writes: a preview stores the normalised arguments and their hash in a pending
transaction; the commit names only the `tx_id` and executes exactly what was stored.

Rules:
- A transaction belongs to one session and one tool; any other session's `tx_id` behaves as
  not found.
- Pending transactions expire (default 15 min, injected clock); committed, aborted or denied
  ones can never be used again.
- Transactions live in broker memory only: a broker restart drops every pending one, which is
  the safe direction (nothing is committed that the person did not see previewed again).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel

from broker.wire.errors import (
    ApprovalDenied,
    TransactionClosed,
    TransactionExpired,
    TransactionNotFound,
)
from broker.wire.protocol import TxInfo, TxSummary

TxState = Literal["pending", "awaiting_owner", "approved", "committed", "aborted", "denied"]
DEFAULT_TTL = timedelta(minutes=15)


def args_hash(params: BaseModel) -> str:
    raw = params.model_dump_json(context={"reveal": True})
    canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Transaction:
    tx_id: str
    accessor: str
    label: str
    tool: str
    method: str  # the wire method the commit runs (entry.add, entry.edit, ...)
    params: BaseModel  # normalised arguments, secrets as SecretStr
    raw_args: dict[str, Any]  # the preview call's arguments, to compare a commit call's
    hash: str
    preview: str
    created_at: datetime
    expires_at: datetime
    policy: str
    entry_id: str | None = None
    base_updated_at: datetime | None = None  # the entry's version the preview was made from
    state: TxState = "pending"
    receipt: str | None = None
    decided_reason: str | None = None
    committed_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"generated": the new value}
    origin: Literal["tool", "wire"] = "tool"  # "wire": held by the gate; approving executes it

    def info(self, now: datetime) -> TxInfo:
        """The session's view of it."""
        return TxInfo(**self._view(now))

    def summary(self, now: datetime) -> TxSummary:
        """The owner's view of it: also whose it is."""
        return TxSummary(**self._view(now), session=self.accessor, label=self.label)

    def _view(self, now: datetime) -> dict[str, Any]:
        return {
            "tx_id": self.tx_id,
            "tool": self.tool,
            "status": self.status(now),
            "preview": self.preview,
            "method": self.method,
            "policy": self.policy,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "receipt": self.receipt,
            "reason": self.decided_reason,
        }

    def status(self, now: datetime) -> str:
        if self.state in ("pending", "awaiting_owner", "approved") and now >= self.expires_at:
            return "expired"
        return self.state


def state_allows(tx: Transaction, now: datetime) -> bool:
    """May the change run now? Approved and live, or the agent's own (policy `agent`)."""
    status = tx.status(now)
    return status == "approved" or (tx.policy == "agent" and status == "pending")


class TxStore:
    def __init__(self, clock: Callable[[], datetime], ttl: timedelta = DEFAULT_TTL) -> None:
        self.clock = clock
        self.ttl = ttl
        self.txs: dict[str, Transaction] = {}

    def create(self, **kw: Any) -> Transaction:
        now = self.clock()
        tx = Transaction(
            tx_id="tx_" + secrets.token_hex(8),
            created_at=now,
            expires_at=now + self.ttl,
            hash=args_hash(kw["params"]),
            **kw,
        )
        self.txs[tx.tx_id] = tx
        self._prune(now)
        return tx

    def _prune(self, now: datetime) -> None:
        if len(self.txs) < 1024:
            return
        cutoff = now - timedelta(days=1)
        for tx_id in [t.tx_id for t in self.txs.values() if t.expires_at < cutoff]:
            del self.txs[tx_id]

    def get(self, tx_id: str, accessor: str | None) -> Transaction:
        """The caller's transaction (accessor None: the owner, who may see any)."""
        tx = self.txs.get(tx_id)
        if tx is None or (accessor is not None and tx.accessor != accessor):
            raise TransactionNotFound(data={"tx_id": tx_id[:64]})
        return tx

    def for_commit(self, tx_id: str, accessor: str, tool: str) -> Transaction:
        tx = self.get(tx_id, accessor)
        if tx.tool != tool:
            raise TransactionNotFound(
                f"this transaction belongs to {tx.tool}, not {tool}",
                hint=f"commit it with {tx.tool}",
            )
        status = tx.status(self.clock())
        if status == "expired":
            raise TransactionExpired(data={"tx_id": tx_id})
        if status == "denied":
            raise ApprovalDenied(
                "the owner denied this transaction",
                data={"tx_id": tx_id, "reason": tx.decided_reason},
            )
        if status in ("committed", "aborted"):
            raise TransactionClosed(f"transaction already {status}", data={"tx_id": tx_id})
        return tx

    def owner_decide(self, tx_id: str, approve: bool, reason: str | None) -> Transaction:
        tx = self.get(tx_id, None)
        status = tx.status(self.clock())
        if status == "expired":
            raise TransactionExpired(data={"tx_id": tx_id})
        if status not in ("pending", "awaiting_owner", "approved"):
            raise TransactionClosed(f"transaction already {status}", data={"tx_id": tx_id})
        tx.state = "approved" if approve else "denied"
        tx.decided_reason = reason
        return tx

    def await_owner(self, tx: Transaction) -> None:
        """The agent asked to commit; the owner has not decided yet."""
        if tx.state == "pending":
            tx.state = "awaiting_owner"

    def person_decided(self, tx: Transaction, approve: bool, reason: str | None = None) -> None:
        """The person answered through the client (policy `client`)."""
        if tx.state not in ("pending", "awaiting_owner"):
            raise TransactionClosed(f"transaction already {tx.state}", data={"tx_id": tx.tx_id})
        tx.state = "approved" if approve else "denied"
        tx.decided_reason = reason

    def conflicted(self, tx: Transaction, reason: str) -> None:
        """The entry or space changed since the preview: this transaction can never run."""
        tx.state = "aborted"
        tx.decided_reason = reason

    def abort(self, tx_id: str, accessor: str) -> Transaction:
        tx = self.get(tx_id, accessor)
        if tx.state in ("committed", "aborted", "denied"):
            raise TransactionClosed(f"transaction already {tx.state}", data={"tx_id": tx_id})
        tx.state = "aborted"
        return tx

    @staticmethod
    def new_receipt() -> str:
        """Minted before the commit runs, so the audit record naming it precedes the change."""
        return "rcpt_" + secrets.token_hex(8)

    def committed(self, tx: Transaction, receipt: str) -> None:
        tx.state = "committed"
        tx.receipt = receipt
        tx.committed_at = self.clock()

    def listing(self, accessor: str | None, states: set[str] | None = None) -> list[Transaction]:
        now = self.clock()
        out = [
            t
            for t in self.txs.values()
            if (accessor is None or t.accessor == accessor)
            and (states is None or t.status(now) in states)
        ]
        return sorted(out, key=lambda t: t.created_at)
