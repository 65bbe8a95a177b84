"""Two-phase writes: a preview stores the normalised arguments and their hash in a pending
transaction; the commit names only the `tx_id` and executes exactly what was stored.

Rules:
- A transaction belongs to one session and one tool; any other session's `tx_id` behaves as
  not found.
- Pending transactions expire (default 15 min, injected clock); committed, aborted or denied
  ones can never be used again.
- Transactions that wait for a person (policy `owner` or `client`) survive a broker restart:
  each is a sealed vault record of kind `tx` (the exact arguments, secrets included, only
  inside AEAD ciphertext), written in the vault commit that creates, decides or closes it, and
  restored at unlock. The commit that executes one writes its `committed` record in the same
  SQLite transaction as the change (`State.landing`), so a crash can neither lose the mark nor
  run the change twice. An agent-policy preview lives in memory only: nobody waits on it, and
  a restart asks the agent to preview again (the safe direction).
- Expiry is not a write: `expires_at` is sealed with the record and a restored transaction
  past it is expired. Closed or expired records are deleted a day after their expiry.
- A decision the audit log holds but the vault file does not (the file was rolled back) closes
  the restored transaction: an approved or denied one never becomes pending again.
- A transaction executes at most once: the run that may execute it first claims it
  (`TxStore.claim`: `pending`/`awaiting_owner`/`approved` -> `committing`, synchronously, on the
  event loop before the run's first await), so two concurrent commit calls, two approvals, or a
  commit racing an approval, a denial or an abort, let exactly one through; every other call is
  refused with TRANSACTION_CLOSED and changes nothing. The run ends it `committed`, `aborted`
  (conflict) or `denied`, or, when it stopped before the change, `release`s it to where it was.
  `committing` lives in memory only: the stored record keeps the state before the claim, so a
  crash mid-run leaves the transaction as it was, or `committed` if its change landed (the mark
  lands with it): never run twice, never lost.
- A run belongs to the unlock it was claimed in. A vault lock (`TxStore.lock`) ends it: a run
  whose change has not started its write stops with VAULT_LOCKED (`check_run`, checked under
  the write lock right before the change, so a lock waits for a write in progress and that one
  lands completely) and is released. The unlock's `restore` never replaces a claimed
  transaction with its stored record (the run still holds it and ends it), so a lock + unlock
  mid-commit cannot hand out a second, unclaimed copy of it.
- A lock drops every transaction from memory (their arguments hold secret values in
  plaintext); one claimed by a run is dropped when the run ends. Those a person decides come
  back from the vault at unlock; an `agent`-policy preview is gone, as after a restart: the
  agent previews again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

from broker.wire.errors import (
    ApprovalDenied,
    TransactionClosed,
    TransactionExpired,
    TransactionNotFound,
    VaultLocked,
)
from broker.wire.protocol import TxInfo, TxSummary

TxState = Literal[
    "pending", "awaiting_owner", "approved", "committing", "committed", "aborted", "denied"
]
DEFAULT_TTL = timedelta(minutes=15)
SURVIVING_POLICIES = frozenset({"owner", "client"})  # a person decides: kept across restarts
RETAIN = timedelta(days=1)  # a closed or expired record is deleted this long after its expiry
OPEN_STATES = frozenset({"pending", "awaiting_owner", "approved"})
STORED_STATES = OPEN_STATES | {"committed", "aborted", "denied"}  # never `committing`
log = logging.getLogger("apm.broker.tx")


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
    resume: TxState | None = None  # while `committing`: the state a run that stops returns it to
    epoch: int | None = None  # while `committing`: the store's unlock epoch the run claimed it in

    @property
    def standing(self) -> TxState:
        """Its state apart from a claim: what it was before the run that holds it."""
        if self.state == "committing" and self.resume is not None:
            return self.resume
        return self.state

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

    @property
    def must_survive(self) -> bool:
        """Kept in the vault (a person decides it), not only in broker memory."""
        return self.policy in SURVIVING_POLICIES

    def to_doc(self) -> bytes:
        """The sealed record's plaintext: everything, the arguments' secrets revealed (it is
        only ever stored inside the record's AEAD ciphertext)."""
        cls = type(self.params)
        doc = {
            "v": 1,
            "tx_id": self.tx_id,
            "accessor": self.accessor,
            "label": self.label,
            "tool": self.tool,
            "method": self.method,
            "params_type": f"{cls.__module__}:{cls.__qualname__}",
            "params": self.params.model_dump(mode="json", context={"reveal": True}),
            "raw_args": self.raw_args,
            "hash": self.hash,
            "preview": self.preview,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "policy": self.policy,
            "entry_id": self.entry_id,
            "base_updated_at": _iso(self.base_updated_at),
            "state": self.standing,  # a claim is never stored: a crash leaves it as it was
            "receipt": self.receipt,
            "decided_reason": self.decided_reason,
            "committed_at": _iso(self.committed_at),
            "extra": self.extra,
            "origin": self.origin,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=_plain).encode()

    @classmethod
    def from_doc(cls, raw: bytes) -> Transaction:
        """A transaction from its record (ValueError/KeyError/TypeError if unreadable)."""
        doc = json.loads(raw)
        params_cls = _params_class(str(doc["params_type"]))
        params = params_cls.model_validate(doc["params"])
        tx = cls(
            tx_id=str(doc["tx_id"]),
            accessor=str(doc["accessor"]),
            label=str(doc["label"]),
            tool=str(doc["tool"]),
            method=str(doc["method"]),
            params=params,
            raw_args=dict(doc["raw_args"]),
            hash=str(doc["hash"]),
            preview=str(doc["preview"]),
            created_at=datetime.fromisoformat(doc["created_at"]),
            expires_at=datetime.fromisoformat(doc["expires_at"]),
            policy=str(doc["policy"]),
            entry_id=doc["entry_id"],
            base_updated_at=_from_iso(doc["base_updated_at"]),
            state=doc["state"],
            receipt=doc["receipt"],
            decided_reason=doc["decided_reason"],
            committed_at=_from_iso(doc["committed_at"]),
            extra=dict(doc["extra"]),
            origin=doc["origin"],
        )
        if tx.state not in STORED_STATES:
            raise ValueError("unknown transaction state")
        if args_hash(params) != tx.hash:  # the arguments are exactly the previewed ones
            raise ValueError("transaction arguments do not match their hash")
        return tx

    def landed(self, receipt: str, at: datetime) -> bytes:
        """The record as it will read once committed with `receipt` (written with the change)."""
        return dataclasses.replace(
            self, state="committed", receipt=receipt, committed_at=at, resume=None
        ).to_doc()


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _from_iso(t: object) -> datetime | None:
    return None if t is None else datetime.fromisoformat(str(t))


def _plain(v: object) -> object:
    """JSON for what a preview call's arguments may hold besides plain JSON."""
    if isinstance(v, SecretStr):
        return v.get_secret_value()
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json", context={"reveal": True})
    raise TypeError(f"cannot store {type(v).__name__}")


def _params_class(name: str) -> type[BaseModel]:
    """The arguments' model class a record names: only apm's own models."""
    module, _, qual = name.partition(":")
    if not (module == "broker" or module.startswith("broker.")) or not qual:
        raise ValueError(f"not an apm model: {name[:80]}")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ValueError(f"not a model: {name[:80]}")
    return obj


def state_allows(tx: Transaction, now: datetime) -> bool:
    """May the change run now? Claimed by the run (`TxStore.claim`) from approved, or from
    pending for the agent's own (policy `agent`)."""
    if tx.state != "committing" or now >= tx.expires_at:
        return False
    return tx.standing == "approved" or (tx.policy == "agent" and tx.standing == "pending")


def _in_progress(tx: Transaction) -> TransactionClosed:
    return TransactionClosed(
        "another call is committing this transaction right now",
        hint="call tx_status for its outcome; it runs at most once",
        data={"tx_id": tx.tx_id, "state": "committing"},
    )


class TxStore:
    def __init__(self, clock: Callable[[], datetime], ttl: timedelta = DEFAULT_TTL) -> None:
        self.clock = clock
        self.ttl = ttl
        self.txs: dict[str, Transaction] = {}
        self.epoch = 0  # advances at every lock and every restore (unlock): a run's claim is one's
        self.sealed = False  # locked: a run that ends drops its transaction from memory

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
        if status == "committing":
            raise _in_progress(tx)
        return tx

    def claim(self, tx: Transaction) -> bool:
        """Take `tx` for the run about to execute it: exactly one caller gets it. Synchronous:
        call it on the event loop before the run's first await.

        True: it is now `committing` and this run's (the run ends it with `committed`,
        `conflicted`, a denial, or `release`). False: nothing was claimed, because an
        owner-policy transaction not yet approved only waits (while it waits the owner may
        still decide it). Raises TRANSACTION_CLOSED while another run holds it, and as
        `for_commit` for one that is closed, expired or denied."""
        status = tx.status(self.clock())
        if status == "committing":
            raise _in_progress(tx)
        if status == "expired":
            raise TransactionExpired(data={"tx_id": tx.tx_id})
        if status == "denied":
            raise ApprovalDenied(
                "the owner denied this transaction",
                data={"tx_id": tx.tx_id, "reason": tx.decided_reason},
            )
        if status not in OPEN_STATES:
            raise TransactionClosed(f"transaction already {status}", data={"tx_id": tx.tx_id})
        if tx.policy == "owner" and tx.state != "approved":
            return False
        tx.resume = tx.state
        tx.state = "committing"
        tx.epoch = self.epoch
        return True

    def check_run(self, tx: Transaction) -> None:
        """May the run holding `tx` make its change now? VAULT_LOCKED if the vault was locked
        (and maybe unlocked again) since the claim: the run then stops and is released.
        Synchronous; the change's write must follow without an await in between."""
        if tx.state != "committing" or tx.epoch != self.epoch or self.sealed:
            raise VaultLocked(
                "the vault was locked while this transaction was being committed; "
                "nothing was changed",
                hint='unlock it ("apm unlock") and commit again: the transaction is as it was',
                data={"tx_id": tx.tx_id},
            )

    def release(self, tx: Transaction) -> None:
        """The run that claimed `tx` stopped before its change: it is as before the claim
        (a run that closed it, committed, aborted or denied, leaves it so)."""
        if tx.state == "committing":
            tx.state = tx.resume or "pending"
        tx.resume = None
        tx.epoch = None
        self._ended(tx)

    def _ended(self, tx: Transaction) -> None:
        """A run ended: while locked its transaction leaves memory (restored at unlock if kept
        in the vault)."""
        if self.sealed and self.txs.get(tx.tx_id) is tx:
            del self.txs[tx.tx_id]

    def lock(self) -> int:
        """The vault is being locked: every run in flight is ended (`check_run`), and every
        transaction no run holds is dropped from memory with its plaintext arguments. Returns
        how many were dropped."""
        self.epoch += 1
        self.sealed = True
        gone = [t.tx_id for t in self.txs.values() if t.state != "committing"]
        for tx_id in gone:
            del self.txs[tx_id]
        return len(gone)

    def owner_decide(self, tx_id: str, approve: bool, reason: str | None) -> Transaction:
        tx = self.get(tx_id, None)
        status = tx.status(self.clock())
        if status == "expired":
            raise TransactionExpired(data={"tx_id": tx_id})
        if status == "committing":
            raise _in_progress(tx)
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
        """The person answered through the client (policy `client`), asked by the run that
        holds the claim: a yes keeps it claimed (approved if the run stops), a no denies it."""
        if tx.standing not in ("pending", "awaiting_owner"):
            raise TransactionClosed(f"transaction already {tx.state}", data={"tx_id": tx.tx_id})
        if approve and tx.state == "committing":
            tx.resume = "approved"
        else:
            tx.state = "approved" if approve else "denied"
            tx.resume = None
        tx.decided_reason = reason

    def conflicted(self, tx: Transaction, reason: str) -> None:
        """The entry or space changed since the preview: this transaction can never run."""
        tx.state = "aborted"
        tx.resume = None
        tx.epoch = None
        tx.decided_reason = reason
        self._ended(tx)

    def abort(self, tx_id: str, accessor: str) -> Transaction:
        tx = self.get(tx_id, accessor)
        if tx.state == "committing":
            raise _in_progress(tx)
        if tx.state in ("committed", "aborted", "denied"):
            raise TransactionClosed(f"transaction already {tx.state}", data={"tx_id": tx_id})
        tx.state = "aborted"
        return tx

    @staticmethod
    def new_receipt() -> str:
        """Minted before the commit runs, so the audit record naming it precedes the change."""
        return "rcpt_" + secrets.token_hex(8)

    def committed(self, tx: Transaction, receipt: str, at: datetime | None = None) -> None:
        tx.state = "committed"
        tx.resume = None
        tx.epoch = None
        tx.receipt = receipt
        tx.committed_at = at or self.clock()
        self._ended(tx)

    # ------------------------------------------------------------------ persistence

    def stale(self, now: datetime) -> list[str]:
        """Transactions whose records may go: expired over RETAIN ago (closed or not)."""
        cutoff = now - RETAIN
        return [t.tx_id for t in self.txs.values() if t.expires_at < cutoff]

    def restore(self, docs: dict[str, bytes], closed_by_log: dict[str, str]) -> list[Transaction]:
        """Replace the transactions in memory with the vault's records (at unlock).

        `closed_by_log`: tx id -> the last decision the audit log holds for it ("denied",
        "approved", "aborted"), for those recorded after the vault file's anchor.
        A record that is still open there was rolled back: it is closed, never run. Returns
        the transactions whose record must be written again.

        A transaction a run holds (`committing`: claimed before a lock, its run not ended yet)
        stays as it is, not replaced by its record: the run ends it (it cannot make its change
        any more, `check_run`), so no second copy of it can be claimed meanwhile."""
        self.epoch += 1
        self.sealed = False
        held = {t.tx_id for t in self.txs.values() if t.state == "committing"}
        for tx_id in [t for t in self.txs if t not in held]:  # `lock` left none; kept ones
            del self.txs[tx_id]  # come from `docs`
        changed: list[Transaction] = []
        for tx_id, raw in docs.items():
            if tx_id in held:
                continue
            try:
                tx = Transaction.from_doc(raw)
            except (ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
                log.error("a stored transaction could not be restored (%s): %s", tx_id, exc)
                continue
            later = closed_by_log.get(tx_id)
            if later is not None and tx.state in OPEN_STATES:
                tx.state = "denied" if later == "denied" else "aborted"
                tx.decided_reason = (
                    f"{later} after the vault file was saved: the vault file was rolled back"
                )
                changed.append(tx)
            self.txs[tx_id] = tx
        return changed

    def listing(self, accessor: str | None, states: set[str] | None = None) -> list[Transaction]:
        now = self.clock()
        out = [
            t
            for t in self.txs.values()
            if (accessor is None or t.accessor == accessor)
            and (states is None or t.status(now) in states)
        ]
        return sorted(out, key=lambda t: t.created_at)
