"""The error contract: one exception class per stable wire code, with its CLI exit code and hint.

Rules:
- A class's `code` is a stable public contract; never rename one.
- Messages are lowercase, without a final period, and never echo user input (it may be a secret).
- `ERRORS` maps every code to its class; tests fail if a code has no class or a class no code.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApmError(Exception):
    """Base of every error that may cross the wire."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    exit_code: ClassVar[int] = 1
    default_message: ClassVar[str] = "internal error"
    default_hint: ClassVar[str | None] = None

    def __init__(
        self,
        message: str | None = None,
        *,
        hint: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.hint = hint if hint is not None else self.default_hint
        self.data = data or {}
        super().__init__(self.message)


class InternalError(ApmError):
    code = "INTERNAL_ERROR"
    exit_code = 1
    default_message = "internal error in the broker"
    default_hint = 'see the broker log ("apm status" shows where it is)'


class InvalidParameters(ApmError):
    code = "INVALID_PARAMETERS"
    exit_code = 10
    default_message = "invalid parameters"


class UnsupportedVersion(ApmError):
    code = "UNSUPPORTED_VERSION"
    exit_code = 12
    default_message = "protocol version not supported"
    default_hint = "upgrade apm so the CLI, shim and broker are the same version"


class RequestTooLarge(ApmError):
    code = "REQUEST_TOO_LARGE"
    exit_code = 10
    default_message = "request exceeds the size limit"


class VaultLocked(ApmError):
    code = "VAULT_LOCKED"
    exit_code = 3
    default_message = "vault is locked"
    default_hint = 'run "apm unlock"'


class VaultNotFound(ApmError):
    code = "VAULT_NOT_FOUND"
    exit_code = 6
    default_message = "no vault found"
    default_hint = 'run "apm init" to create one'


class BadPassword(ApmError):
    code = "BAD_PASSWORD"
    exit_code = 4
    default_message = "wrong master password"
    default_hint = "try again; the password is case-sensitive"


class VaultCorrupt(ApmError):
    code = "VAULT_CORRUPT"
    exit_code = 8
    default_message = "vault file is damaged (checksum mismatch)"
    default_hint = "restore the previous version from <vault>.bak or a backup"


class VaultTruncated(ApmError):
    code = "VAULT_TRUNCATED"
    exit_code = 8
    default_message = "vault file is truncated"
    default_hint = "restore the previous version from <vault>.bak or a backup"


class VaultBadMagic(ApmError):
    code = "VAULT_BAD_MAGIC"
    exit_code = 8
    default_message = "file is not an apm vault"
    default_hint = "check APM_VAULT_PATH / APM_HOME"


class VaultUnsupportedVersion(ApmError):
    code = "VAULT_UNSUPPORTED_VERSION"
    exit_code = 8
    default_message = "vault format version is not supported by this apm"
    default_hint = "upgrade apm to a version that reads this vault"


class StorageError(ApmError):
    code = "STORAGE_ERROR"
    exit_code = 11
    default_message = "could not save the vault; nothing was changed"
    default_hint = "check free disk space and permissions of the vault directory"


class SessionRequired(ApmError):
    code = "SESSION_REQUIRED"
    exit_code = 5
    default_message = "a valid session or the master password is required"
    default_hint = 'ask the owner to run "apm delegate"'


class PermissionDenied(ApmError):
    code = "PERMISSION_DENIED"
    exit_code = 5
    default_message = "permission denied"


class EntryNotFound(ApmError):
    code = "ENTRY_NOT_FOUND"
    exit_code = 6
    default_message = "entry not found"
    default_hint = 'run "apm ls" or "apm search QUERY" to find it'


class AmbiguousEntry(ApmError):
    code = "AMBIGUOUS_ENTRY"
    exit_code = 10
    default_message = "entry name exists in several spaces"
    default_hint = "add --space SPACE or use the entry id"


class SpaceNotFound(ApmError):
    code = "SPACE_NOT_FOUND"
    exit_code = 6
    default_message = "space not found"
    default_hint = 'run "apm space ls"'


class SpaceNotEmpty(ApmError):
    code = "SPACE_NOT_EMPTY"
    exit_code = 7
    default_message = "space is not empty"
    default_hint = "move or remove its entries first, or pass --force to remove them too"


class AlreadyExists(ApmError):
    code = "ALREADY_EXISTS"
    exit_code = 7
    default_message = "already exists"


class TransactionExpired(ApmError):
    code = "TRANSACTION_EXPIRED"
    exit_code = 6
    default_message = "transaction expired"
    default_hint = "call the write tool again without tx_id for a fresh preview"


class TransactionNotFound(ApmError):
    code = "TRANSACTION_NOT_FOUND"
    exit_code = 6
    default_message = "transaction not found"
    default_hint = "call the write tool without tx_id for a new preview"


class TransactionClosed(ApmError):
    code = "TRANSACTION_CLOSED"
    exit_code = 7
    default_message = "transaction already committed or aborted"
    default_hint = "call the write tool without tx_id for a new preview"


class TransactionConflict(ApmError):
    code = "TRANSACTION_CONFLICT"
    exit_code = 7
    default_message = "the entry changed since the preview"
    default_hint = "review the fresh preview in this error and commit its tx_id"


class RequestNotFound(ApmError):
    code = "REQUEST_NOT_FOUND"
    exit_code = 6
    default_message = "access request not found"
    default_hint = 'list them with "apm request ls" (agents: list_my_requests)'


class RequestClosed(ApmError):
    code = "REQUEST_CLOSED"
    exit_code = 7
    default_message = "access request already decided"
    default_hint = "ask for access again with request_access"


class ApprovalDenied(ApmError):
    code = "APPROVAL_DENIED"
    exit_code = 5
    default_message = "the change was not approved"


class ApprovalPending(ApmError):
    """Not a failure of the request: the change is held until the person approves it."""

    code = "APPROVAL_PENDING"
    exit_code = 13
    default_message = "the change waits for the person's approval; nothing was changed yet"
    default_hint = 'the person approves it with "apm tx approve TX_ID"'


class BrokerUnavailable(ApmError):
    code = "BROKER_UNAVAILABLE"
    exit_code = 9
    default_message = "broker is not running"
    default_hint = 'run "apm broker start"'


class BrokerRunning(ApmError):
    code = "BROKER_RUNNING"
    exit_code = 9
    default_message = "another broker is already running on this socket"
    default_hint = 'use it, or stop it with "apm broker stop"'


class SyncUnavailable(ApmError):
    code = "SYNC_UNAVAILABLE"
    exit_code = 9
    default_message = (
        "the sync cluster has no quorum or cannot be reached; synced writes are refused"
    )
    default_hint = (
        'reads still come from this machine\'s replica; check "apm sync status" and the etcd '
        "members, then retry"
    )


class SyncRecordRefused(ApmError):
    code = "SYNC_RECORD_REFUSED"
    exit_code = 8
    default_message = "a synced record failed its integrity check and was refused"
    default_hint = '"apm sync status" lists refused records; rewrite the entry from a good device'


class SyncNotMember(ApmError):
    code = "SYNC_NOT_MEMBER"
    exit_code = 5
    default_message = "this device is not a member of the synced space"
    default_hint = 'ask the person (the space\'s admin) to run "apm sync approve DEVICE"'


class Cancelled(ApmError):
    code = "CANCELLED"
    exit_code = 130
    default_message = "cancelled"


class ExternalToolMissing(ApmError):
    """A program apm drives (a clipboard tool, gpg) is not installed or cannot run."""

    code = "EXTERNAL_TOOL_MISSING"
    exit_code = 14
    default_message = "a program apm needs for this is not installed"


class PluginUnavailable(ApmError):
    """A plugin's part is needed (an entry type, an importer) and the plugin is not enabled,
    failed to load, or broke its contract. `data` names the `plugin` (KIND.NAME), its
    `distribution` and the `reason`: disabled, failed or invalid."""

    code = "PLUGIN_UNAVAILABLE"
    exit_code = 10
    default_message = "a plugin this needs is not enabled or failed"
    default_hint = 'the person lists plugins and their state with "apm plugin ls"'


def _all_subclasses(cls: type[ApmError]) -> list[type[ApmError]]:
    out: list[type[ApmError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERRORS: dict[str, type[ApmError]] = {c.code: c for c in _all_subclasses(ApmError)}


def error_from_wire(
    code: str, message: str, hint: str | None = None, data: dict[str, Any] | None = None
) -> ApmError:
    """The one place a wire error becomes an exception again (client side)."""
    cls = ERRORS.get(code, InternalError)
    err = cls(message, hint=hint, data=data)
    if cls is InternalError and code != "INTERNAL_ERROR":
        err.data = {**err.data, "code": code}
    return err
