"""Rollback defences: the vault and the audit log each record the other's progress, so an
older copy of either is noticed at unlock, and revocations survive both.

- At every save the vault records, inside its authenticated payload (`extra["anchor"]`), its
  generation (one more than any generation saved before) and the audit log's head (seq and
  line hash) at that moment; after the save the log records `vault.saved generation=N`.
- At unlock: a log that no longer holds the head the vault recorded was truncated or replaced
  with an older copy; a vault whose generation is behind the newest `vault.saved` was rolled
  back. Both are reported (unlock result, status, doctor) and recorded as incidents in the log.
- Revocations are journaled in the log (`session.revoked`). At unlock, those recorded after
  the vault's recorded head are applied again, so an older vault file cannot revive a revoked
  session; revocations made while locked are applied from the broker's memory as well as from
  `pending-revocations.json`, and what the file lost is reported.

Rules:
- A same-user process that replaces the vault, the log and its checkpoint with copies taken at
  the same moment, and restarts the broker, is not detected: every file it can write agrees.
  Only an anchor outside this machine can catch that (the sync issue provides one).
- Nothing here holds a secret: accessors, generation numbers and record hashes only.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.wire.errors import StorageError

from .audit import GENESIS, AuditLog
from .sessions import PendingRevocations, SessionStore
from .vault import Vault

log = logging.getLogger("apm.broker.rollback")

ANCHOR = "anchor"  # the key in the vault payload's `extra`


@dataclass(frozen=True)
class Anchor:
    """What a saved vault says about itself and about the audit log at the time of the save."""

    generation: int = 0
    audit_seq: int = 0
    audit_hash: str = GENESIS

    @classmethod
    def of(cls, vault: Vault) -> Anchor:
        doc = vault.extra.get(ANCHOR)
        if not isinstance(doc, dict):
            return cls()  # a vault saved before anchors existed: generation 0
        try:
            return cls(int(doc["generation"]), int(doc["audit_seq"]), str(doc["audit_hash"]))
        except (KeyError, TypeError, ValueError):
            return cls()

    def to_extra(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "audit_seq": self.audit_seq,
            "audit_hash": self.audit_hash,
        }


class SaveStamp:
    """The vault's save hook: stamp generation and audit head before, journal it after."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.generation = 0

    def before(self, vault: Vault) -> None:
        seq, head = self.audit.head()
        self.audit.sync()
        self.generation = max(Anchor.of(vault).generation, self.audit.journal.generation) + 1
        vault.extra[ANCHOR] = Anchor(self.generation, seq, head).to_extra()

    def after(self, vault: Vault) -> None:
        # the save is durable already: a failed record must not undo it (the operation's own
        # record fails the same way and refuses it); unlock then sees the vault ahead, not behind
        try:
            self.audit.append("vault.saved", generation=self.generation)
        except StorageError:
            log.error("vault generation %d saved, not recorded in the audit log", self.generation)


@dataclass
class UnlockCheck:
    warnings: list[str] = field(default_factory=list)
    must_save: bool = False  # revocations applied, or an older file to be superseded


class RollbackGuard:
    """The broker's memory of what the vault file may lose, for the broker's whole life."""

    def __init__(self, pending: PendingRevocations) -> None:
        self.pending = pending
        self.notes: list[str] = []  # found at unlocks, for status and doctor

    def attach(self, vault: Vault, audit: AuditLog | None) -> None:
        if audit is not None:
            vault.save_hook = SaveStamp(audit)

    def integrity(self, audit: AuditLog | None) -> list[str]:
        """Everything this broker noticed: its log deleted or replaced, rollbacks at unlock."""
        if audit is not None:
            with contextlib.suppress(StorageError):  # refused operations say so themselves
                audit.check_file()
        return [*(audit.incidents if audit is not None else []), *self.notes]

    def at_unlock(self, vault: Vault, audit: AuditLog | None, store: SessionStore) -> UnlockCheck:
        """Compare the vault and the log, and apply every revocation either lost."""
        out = UnlockCheck()
        self._pending(store, audit, out)
        if audit is None:
            return out
        with contextlib.suppress(StorageError):
            audit.check_file()
        anchor = Anchor.of(vault)
        problem = audit.compare_vault_head((anchor.audit_seq, anchor.audit_hash))
        if problem is not None:
            self._warn(out, f"audit log: {problem}")
            audit.append("audit.behind_vault", problem=problem, vault_seq=anchor.audit_seq)
            out.must_save = True  # the next save records the log as it is now
        j = audit.journal
        if anchor.generation < j.generation:
            self._warn(
                out,
                f"vault file rolled back: it is generation {anchor.generation}, but generation "
                f"{j.generation} was saved at {j.generation_ts[:19]} (audit record "
                f"{j.generation_seq}); changes saved since then are not in it",
            )
            audit.append("vault.rolled_back", generation=anchor.generation, recorded=j.generation)
            out.must_save = True  # a new generation, so the next unlock does not warn again
        done: list[str] = []
        for r in j.revocations_after(anchor.audit_seq):
            done += [a for a in r.accessors if store.revoke(a)]
            if r.all_before is not None:
                done += store.revoke_all(datetime.fromisoformat(r.all_before))
        if done:
            self._warn(
                out,
                f"re-applied {len(done)} revocation(s) recorded in the audit log that the vault "
                f"file did not hold: {','.join(done)}",
            )
            audit.append("session.revocations_reapplied", target=",".join(done))
            out.must_save = True
        return out

    def _pending(self, store: SessionStore, audit: AuditLog | None, out: UnlockCheck) -> None:
        pending = self.pending
        if not pending.waiting:
            return
        lost = pending.missing_from_file()
        done = pending.apply(store)
        if lost:
            names = ",".join(
                _shown(i.get("accessor") or f"all before {i.get('all_before')}") for i in lost
            )
            self._warn(
                out,
                f"{len(lost)} revocation(s) made while locked were missing from "
                f"{pending.path.name} (deleted or edited); applied from the broker's memory: "
                f"{names}",
            )
            if audit is not None:
                audit.append("session.pending_mismatch", target=names)
        if done:
            log.info("applied %d revocation(s) made while locked: %s", len(done), ",".join(done))
        out.must_save = True

    def _warn(self, out: UnlockCheck, text: str) -> None:
        log.error("%s", text)
        out.warnings.append(text)
        if text not in self.notes:
            self.notes.append(text)


def _shown(text: str) -> str:
    """A caller-given accessor in a warning: printable characters only, cut short."""
    return "".join(c if c.isprintable() and c != "," else "?" for c in text[:64])
