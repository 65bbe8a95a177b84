"""The versioned request/response envelopes and every method's params and result models.

Rules:
- This module imports nothing but pydantic and the rest of `broker.wire`.
- Secrets travel as `SecretStr`: masked in repr/str/logs, revealed only by `encode()`.
- Methods are named `noun.verb`; `METHODS` is the one table of them.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    StrictInt,
    field_serializer,
)

from .entries import (
    DEFAULT_SPACE,
    FIELD_NAME_PATTERN,
    NAME_MAX,
    SPACE_PATTERN,
    TAG_MAX,
    VALUE_MAX,
    EntryMeta,
    EntryType,
)
from .relay import MIN_PROTOCOL_VERSION as MIN_PROTOCOL_VERSION  # re-exported
from .relay import PROTOCOL_VERSION as PROTOCOL_VERSION  # re-exported

MAX_FRAME_BYTES = 1 << 20  # requests above this are refused with REQUEST_TOO_LARGE
BATCH_MAX = 10_000  # entries per entry.add_batch (the frame limit usually binds first)

KdfProfile = Literal["interactive", "standard", "hardened"]
KDF_PROFILE_NAMES: tuple[str, ...] = ("interactive", "standard", "hardened")


def _reveal(value: SecretStr | None, info: SerializationInfo) -> str | None:
    if value is None:
        return None
    if info.context and info.context.get("reveal"):
        return value.get_secret_value()
    return "**********"


class Wire(BaseModel):
    """Validators are built on first use: a one-shot CLI call needs a handful of ~60 models."""

    model_config = ConfigDict(defer_build=True)


class Strict(Wire):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class Auth(Strict):
    """How the caller proves itself: the master password (owner) or a session token."""

    password: SecretStr | None = Field(default=None, max_length=4096)
    token: SecretStr | None = Field(default=None, max_length=512)
    agent: str | None = Field(default=None, max_length=128)  # self-declared; never trusted alone

    @field_serializer("password", "token")
    def _ser(self, v: SecretStr | None, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class Request(Strict):
    v: StrictInt
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=64)
    method: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold secrets
    auth: Auth | None = None
    client: str | None = Field(default=None, max_length=128)

    def encode(self) -> bytes:
        """The one place a request's secrets are revealed: into the frame sent to the broker."""
        return self.model_dump_json(context={"reveal": True}, exclude_none=True).encode()


class ErrorBody(Wire):
    code: str
    message: str
    hint: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Response(Wire):
    v: int = PROTOCOL_VERSION
    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def encode_result(model: BaseModel) -> dict[str, Any]:
    """Results may carry a secret the caller is allowed to see (entry.get): reveal it."""
    out: dict[str, Any] = json.loads(model.model_dump_json(context={"reveal": True}))
    return out


# ---------------------------------------------------------------- params and results


class Empty(Strict):
    pass


class PingResult(Wire):
    version: str
    protocol: int
    min_protocol: int
    pid: int


class Hardening(Wire):
    dumpable: bool | None
    core_limit: int | None
    mlocked: bool


class StatusResult(Wire):
    version: str
    protocol: int
    pid: int
    uid: int
    socket: str
    vault_path: str
    vault_exists: bool
    locked: bool
    profile: str | None = None
    entries: int | None = None
    unlocked_at: datetime | None = None
    idle_lock_at: datetime | None = None
    hard_lock_at: datetime | None = None
    log_path: str
    hardening: Hardening
    mcp_connections: int = 0
    integrity: list[str] = Field(default_factory=list)  # rollback / deleted log, this broker
    throttle_failures: int = 0  # failed token attempts counted against the caller's uid


class InitParams(Strict):
    profile: KdfProfile = "standard"


class InitResult(Wire):
    vault_path: str
    profile: str


class UnlockResult(Wire):
    entries: int
    idle_lock_at: datetime
    hard_lock_at: datetime
    warnings: list[str] = Field(default_factory=list)  # vault or audit log rolled back


class LockResult(Wire):
    was_unlocked: bool


class PasswdParams(Strict):
    new_password: SecretStr = Field(min_length=1, max_length=4096)

    @field_serializer("new_password")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class ProfileInfo(Wire):
    profile: str
    memory_kib: int
    time_cost: int
    parallelism: int


class ProfileSetParams(Strict):
    profile: KdfProfile


class EntryRef(Strict):
    """An entry by id, or by name (optionally within a space)."""

    ref: str = Field(min_length=1, max_length=NAME_MAX)
    space: str | None = Field(default=None, pattern=SPACE_PATTERN)


class SecretValue(Strict):
    value: SecretStr = Field(max_length=VALUE_MAX)

    @field_serializer("value")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class EntryAddParams(Strict):
    type: EntryType
    name: str = Field(min_length=1, max_length=NAME_MAX)
    space: str = Field(default=DEFAULT_SPACE, pattern=SPACE_PATTERN)
    tags: list[str] = Field(default_factory=list, max_length=64)
    url: str | None = Field(default=None, max_length=2048)
    notes: str | None = Field(default=None, max_length=VALUE_MAX)
    fields: dict[str, str] = Field(default_factory=dict, max_length=64)
    secrets: dict[str, SecretValue] = Field(default_factory=dict, max_length=64)


class EntryResult(Wire):
    entry: EntryMeta


class EntryBatchParams(Strict):
    """Many `entry.add`s committed at once (`apm add --batch`, importers)."""

    entries: list[EntryAddParams] = Field(min_length=1, max_length=BATCH_MAX)
    atomic: bool = False  # the first refused item refuses the batch; its index is in the error


class BatchRefusal(Wire):
    index: int  # the item's position in `entries`
    code: str
    message: str


class EntryBatchResult(Wire):
    added: list[str]  # ids of the added entries, in batch order
    refused: list[BatchRefusal]


class VaultBackupParams(Strict):
    # a file name: the broker writes only into the vault's own backups directory (the CLI
    # then moves the file where the person asked), never to a path a caller names
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class VaultBackupResult(Wire):
    path: str
    size: int


class VaultMigrateParams(Strict):
    finish: bool = False  # delete the v1 backups a migration kept


class VaultMigrateResult(Wire):
    format: int
    generation: int
    v1_backups: list[str]  # still kept
    removed: list[str]


class EntryListParams(Strict):
    space: str | None = Field(default=None, pattern=SPACE_PATTERN)
    type: EntryType | None = None
    tag: str | None = Field(default=None, max_length=TAG_MAX)
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=1000, ge=1, le=100_000)


class EntryListResult(Wire):
    entries: list[EntryMeta]
    total: int


class EntrySearchParams(Strict):
    query: str = Field(min_length=1, max_length=256)
    space: str | None = Field(default=None, pattern=SPACE_PATTERN)
    type: EntryType | None = None
    tag: str | None = Field(default=None, max_length=TAG_MAX)
    limit: int = Field(default=50, ge=1, le=1000)


class SearchHit(Wire):
    entry: EntryMeta
    score: float


class EntrySearchResult(Wire):
    hits: list[SearchHit]


class EntryGetParams(EntryRef):
    field: str | None = Field(default=None, pattern=FIELD_NAME_PATTERN)


class EntryGetResult(Wire):
    id: str
    name: str
    field: str
    value: SecretStr

    @field_serializer("value")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class EntryEditParams(EntryRef):
    # optimistic concurrency: refuse (TRANSACTION_CONFLICT) if the entry changed since
    expect_updated_at: datetime | None = None
    new_name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX)
    move_to: str | None = Field(default=None, pattern=SPACE_PATTERN)
    add_tags: list[str] = Field(default_factory=list, max_length=64)
    remove_tags: list[str] = Field(default_factory=list, max_length=64)
    url: str | None = Field(default=None, max_length=2048)
    notes: str | None = Field(default=None, max_length=VALUE_MAX)
    fields: dict[str, str] = Field(default_factory=dict, max_length=64)
    secrets: dict[str, SecretValue] = Field(default_factory=dict, max_length=64)
    remove_fields: list[str] = Field(default_factory=list, max_length=64)


class EntryRemoveParams(EntryRef):
    expect_updated_at: datetime | None = None


class EntryRemoveResult(Wire):
    id: str
    name: str


class EntryHistoryParams(EntryRef):
    reveal: bool = False  # previous values in clear: the owner only


class SecretVersion(Wire):
    field: str
    version: int  # 0 = the current value, 1 = the one before it, ...
    replaced_at: datetime | None  # None for the current value
    value: SecretStr | None = None  # only with reveal

    @field_serializer("value")
    def _ser(self, v: SecretStr | None, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class EntryHistoryResult(Wire):
    id: str
    name: str
    versions: list[SecretVersion]


class EntryRestoreParams(EntryRef):
    field: str | None = Field(default=None, pattern=FIELD_NAME_PATTERN)
    version: int = Field(ge=1, le=1000)


class TotpResult(Wire):
    id: str
    name: str
    code: str
    remaining: int
    period: int


class SpaceInfo(Wire):
    name: str
    entries: int


class SpaceListResult(Wire):
    spaces: list[SpaceInfo]


class SpaceAddParams(Strict):
    name: str = Field(pattern=SPACE_PATTERN)


class SpaceRenameParams(Strict):
    name: str = Field(pattern=SPACE_PATTERN)
    new_name: str = Field(pattern=SPACE_PATTERN)
    # optimistic concurrency: the entry ids the space must still hold (TRANSACTION_CONFLICT)
    expect_entries: list[str] | None = None


class SpaceRemoveParams(Strict):
    name: str = Field(pattern=SPACE_PATTERN)
    force: bool = False
    expect_entries: list[str] | None = None


class SpaceRemoveResult(Wire):
    name: str
    removed_entries: int


class ShutdownResult(Wire):
    pid: int


# ---------------------------------------------------------------- sessions

Scope = Literal["read", "secrets", "write", "admin"]
SCOPE_NAMES: tuple[str, ...] = ("read", "secrets", "write", "admin")


class SessionCreateParams(Strict):
    label: str = Field(default="", max_length=128)
    scope: Scope = "read"
    ttl_seconds: int = Field(default=15 * 60, ge=1)
    idle_seconds: int | None = Field(default=None, ge=1)
    max_uses: int | None = Field(default=None, ge=1)
    bind_host: bool = True
    pid: int | None = Field(default=None, ge=1)
    agent: str | None = Field(default=None, max_length=64)
    agent_exe: str | None = Field(default=None, max_length=4096)
    # with agent_exe: also pin that file's identity (stat: device, inode, size, mtime)
    agent_exe_pin: Literal["stat", "sha256"] | None = None
    pin: bool = False
    approve: Literal["agent", "client", "owner"] = "agent"
    # MCP tool names for this session (None: the broker's [mcp] tool_names setting)
    tool_names: Literal["apm", "apono"] | None = None
    spaces: list[str] = Field(default_factory=list, max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=64)
    entries: list[str] = Field(default_factory=list, max_length=64)


class SessionFields(Wire):
    """What a session's stored record (core `SessionRecord`) and its wire view (`SessionInfo`)
    share, declared once: both derive from it, and `session_info` copies exactly these fields,
    so a field added here reaches both and a field added to only one of them fails
    tests/test_models.py."""

    accessor: str
    label: str = ""
    scope: Scope = "read"
    created_at: datetime
    expires_at: datetime
    idle_seconds: int | None = None
    max_uses: int | None = None
    last_used_at: datetime | None = None
    use_count: int = 0
    revoked_at: datetime | None = None
    declared_agent: str | None = None
    approve: Literal["agent", "client", "owner"] = "agent"  # who approves this session's writes
    # MCP tool naming chosen at delegation (None: the broker's [mcp] tool_names)
    tool_names: Literal["apm", "apono"] | None = None


class SessionInfo(SessionFields):
    """The wire view of a session: the shared fields plus what is derived for display (never
    the token hash)."""

    scopes: list[str]
    state: str
    filter: dict[str, list[str]] = Field(default_factory=dict)
    bindings: dict[str, Any] = Field(default_factory=dict)


class SessionCreateResult(Wire):
    token: SecretStr
    session: SessionInfo

    @field_serializer("token")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class SessionListResult(Wire):
    sessions: list[SessionInfo]


class SessionRef(Strict):
    accessor: str = Field(min_length=4, max_length=64)


class SessionRevokeParams(Strict):
    accessor: str | None = Field(default=None, min_length=4, max_length=64)
    token: SecretStr | None = Field(default=None, max_length=512)  # e.g. from a client config
    all: bool = False

    @field_serializer("token")
    def _ser(self, v: SecretStr | None, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class SessionRevokeResult(Wire):
    revoked: list[str]
    pending: bool = False  # vault locked: recorded, applied at the next unlock


class DenialInfo(Wire):
    at: datetime
    reason: str
    peer_pid: int | None = None
    seen: list[str] = Field(default_factory=list)


class SessionWhyResult(Wire):
    session: SessionInfo
    denials: list[DenialInfo]


class SessionDiagnoseResult(Wire):
    """A dry run of the session in `auth.token` for the calling process (nothing recorded)."""

    known: bool
    accessor: str | None = None
    state: str | None = None
    scope: str | None = None
    expires_at: datetime | None = None
    problem: str | None = None  # the rule that would refuse this process, by kind


class WhoAmIResult(Wire):
    """What the caller is: the owner (master password) or a session."""

    owner: bool
    session: SessionInfo | None = None


# ---------------------------------------------------------------- MCP relay
# (frame kinds and the protocol version: broker.wire.relay, shared with the shim)


class McpAttachParams(Strict):
    client_name: str | None = Field(default=None, max_length=128)


class McpAttachResult(Wire):
    conn: str
    accessor: str
    scope: str
    expires_at: datetime


class McpDetachParams(Strict):
    conn: str = Field(max_length=64)


# ---------------------------------------------------------------- audit


class AuditListParams(Strict):
    since: datetime | None = None
    session: str | None = Field(default=None, max_length=64)
    event: str | None = Field(default=None, max_length=64)
    after_seq: int = Field(default=0, ge=0)
    limit: int = Field(default=1000, ge=1, le=10_000)


class AuditListResult(Wire):
    records: list[dict[str, Any]]
    last_seq: int


class AuditVerifyResult(Wire):
    ok: bool
    records: int
    findings: list[str]
    warnings: list[str] = Field(default_factory=list)  # incidents the log recorded


# ---------------------------------------------------------------- transactions (owner side)


class TxListParams(Strict):
    pending: bool = False


class TxInfo(Wire):
    """A transaction as its own session sees it (the `tx_status`/`tx_list` tools)."""

    tx_id: str
    tool: str
    status: str
    preview: str
    # what approving executes: the stored arguments, secrets as length + fingerprint (#13.1)
    method: str = ""
    args: dict[str, Any] = Field(default_factory=dict)
    policy: str
    created_at: datetime
    expires_at: datetime
    receipt: str | None = None
    reason: str | None = None


class TxSummary(TxInfo):
    """A transaction as the owner sees it (`apm tx ls`): also whose it is."""

    session: str
    label: str
    page_url: str | None = None  # the approval page for it, while it awaits the person


class TxListResult(Wire):
    transactions: list[TxSummary]


class TxDecideParams(Strict):
    tx_id: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=500)


# ---------------------------------------------------------------- the approval page


class ApprovalLinkParams(Strict):
    kind: Literal["tx", "request"]
    id: str = Field(max_length=64)


class ApprovalLinkResult(Wire):
    url: str | None  # None: no page is served, or the item is no longer pending
    state: str


class PasskeyBeginResult(Wire):
    url: str
    expires_at: datetime


class PasskeyInfo(Wire):
    id: str  # the credential id's first characters (base64url)
    label: str
    created_at: str


class PasskeyListResult(Wire):
    passkeys: list[PasskeyInfo]


class PasskeyRemoveParams(Strict):
    id: str = Field(min_length=4, max_length=200)  # the id as listed (a prefix is enough)


# ---------------------------------------------------------------- just-in-time access


class RequestListParams(Strict):
    pending: bool = False


# a grant's kind: "use" (references resolve for `apm run`) or "reveal" (the value reaches the
# caller); core.requests re-exports it
GrantKind = Literal["use", "reveal"]


class AccessRequestFields(Wire):
    """What an access request's two views share, declared once: the wire's `AccessRequestInfo`
    (`apm request ls`, the approval page) and the MCP tools' `RequestInfo`
    (tool_operations, which publishes `id` as `request_id` and `minutes` as
    `duration_minutes`). Both derive from it and `AccessRequest.shown` fills exactly these
    fields, so a field added here reaches both views and one added to a single view fails
    tests/test_models.py. No defaults: both views always carry every field, and the tool's
    outputSchema lists each as required."""

    id: str
    state: str  # the stored state with expiry applied (AccessRequest.status)
    entry: str  # the entry's name when asked
    entry_id: str
    space: str
    field: str | None
    minutes: int
    justification: str
    access: GrantKind  # the grant kind asked for (approved: given)
    created_at: datetime
    decided_at: datetime | None
    expires_at: datetime | None
    reason: str | None


class AccessRequestInfo(AccessRequestFields):
    """An access request as the person sees it: the shared fields, whose it is, and how to
    decide on it."""

    session: str
    label: str
    totp_seed: bool = False  # the request names a TOTP seed: approving gives the seed itself
    reference: str
    approve_command: str
    page_url: str | None = None  # the approval page for it, while it is pending


class RequestListResult(Wire):
    requests: list[AccessRequestInfo]


class RequestDecideParams(Strict):
    request_id: str = Field(max_length=64)
    minutes: int | None = Field(default=None, ge=1)
    use_only: bool = False  # approve a `reveal` request as a `use` grant
    reason: str | None = Field(default=None, max_length=500)


class RequestRefParams(Strict):
    request_id: str = Field(max_length=64)


class SecretResolveParams(Strict):
    refs: list[str] = Field(min_length=1, max_length=64)


class ResolvedSecret(Wire):
    ref: str
    value: SecretStr

    @field_serializer("value")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class SecretResolveResult(Wire):
    secrets: list[ResolvedSecret]


# ---------------------------------------------------------------------- sync (etcd)


class SyncTls(Strict):
    # file paths (the broker reads them); a client key file must stay private to the user
    cacert: str | None = Field(default=None, max_length=4096)
    cert: str | None = Field(default=None, max_length=4096)
    key: str | None = Field(default=None, max_length=4096)


class SyncInitParams(Strict):
    endpoints: list[str] = Field(min_length=1, max_length=16)
    tls: SyncTls = Field(default_factory=SyncTls)
    space: str = Field(pattern=SPACE_PATTERN)


class SyncInitResult(Wire):
    space: str
    space_id: str
    device: str
    uploaded: int


class SyncSpaceParams(Strict):
    space: str = Field(pattern=SPACE_PATTERN)


class SyncInviteResult(Wire):
    space: str
    code: SecretStr  # one-time; shown once to the owner

    @field_serializer("code")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class SyncJoinParams(Strict):
    code: SecretStr = Field(max_length=4096)
    endpoints: list[str] = Field(min_length=1, max_length=16)
    tls: SyncTls = Field(default_factory=SyncTls)

    @field_serializer("code")
    def _ser(self, v: SecretStr, info: SerializationInfo) -> str | None:
        return _reveal(v, info)


class SyncJoinResult(Wire):
    space: str
    device: str


class SyncDeviceParams(Strict):
    device: str = Field(max_length=64, pattern=r"^dev-[0-9a-f]{1,32}$")
    space: str | None = Field(default=None, pattern=SPACE_PATTERN)


class SyncDeviceResult(Wire):
    space: str
    device: str
    revision: int


class SyncStatusResult(Wire):
    configured: bool
    device: str | None = None
    # the cluster holds a later vault generation from this device than the open vault's
    rollback_suspected: bool = False
    endpoints: list[dict[str, Any]] = Field(default_factory=list)
    spaces: list[dict[str, Any]] = Field(default_factory=list)


# method -> (params model, result model)
METHODS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "broker.ping": (Empty, PingResult),
    "broker.status": (Empty, StatusResult),
    "broker.shutdown": (Empty, ShutdownResult),
    "vault.init": (InitParams, InitResult),
    "vault.unlock": (Empty, UnlockResult),
    "vault.lock": (Empty, LockResult),
    "vault.passwd": (PasswdParams, Empty),
    "profile.show": (Empty, ProfileInfo),
    "profile.set": (ProfileSetParams, ProfileInfo),
    "entry.add": (EntryAddParams, EntryResult),
    "entry.add_batch": (EntryBatchParams, EntryBatchResult),
    "vault.backup": (VaultBackupParams, VaultBackupResult),
    "vault.migrate": (VaultMigrateParams, VaultMigrateResult),
    "entry.list": (EntryListParams, EntryListResult),
    "entry.search": (EntrySearchParams, EntrySearchResult),
    "entry.show": (EntryRef, EntryResult),
    "entry.get": (EntryGetParams, EntryGetResult),
    "entry.edit": (EntryEditParams, EntryResult),
    "entry.remove": (EntryRemoveParams, EntryRemoveResult),
    "entry.totp": (EntryRef, TotpResult),
    "entry.history": (EntryHistoryParams, EntryHistoryResult),
    "entry.restore": (EntryRestoreParams, EntryResult),
    "space.list": (Empty, SpaceListResult),
    "space.add": (SpaceAddParams, SpaceInfo),
    "space.rename": (SpaceRenameParams, SpaceInfo),
    "space.remove": (SpaceRemoveParams, SpaceRemoveResult),
    "sync.init": (SyncInitParams, SyncInitResult),
    "sync.invite": (SyncSpaceParams, SyncInviteResult),
    "sync.join": (SyncJoinParams, SyncJoinResult),
    "sync.approve": (SyncDeviceParams, SyncDeviceResult),
    "sync.remove": (SyncDeviceParams, SyncDeviceResult),
    "sync.revoke_sessions": (SyncDeviceParams, SyncDeviceResult),
    "sync.status": (Empty, SyncStatusResult),
    "sync.now": (Empty, SyncStatusResult),
    "session.create": (SessionCreateParams, SessionCreateResult),
    "session.list": (Empty, SessionListResult),
    "session.show": (SessionRef, SessionInfo),
    "session.why": (SessionRef, SessionWhyResult),
    "session.revoke": (SessionRevokeParams, SessionRevokeResult),
    "session.whoami": (Empty, WhoAmIResult),
    "session.diagnose": (Empty, SessionDiagnoseResult),
    "audit.list": (AuditListParams, AuditListResult),
    "request.list": (RequestListParams, RequestListResult),
    "request.approve": (RequestDecideParams, AccessRequestInfo),
    "request.deny": (RequestDecideParams, AccessRequestInfo),
    "request.revoke": (RequestRefParams, AccessRequestInfo),
    "secret.resolve": (SecretResolveParams, SecretResolveResult),
    "tx.list": (TxListParams, TxListResult),
    "tx.approve": (TxDecideParams, TxSummary),
    "tx.deny": (TxDecideParams, TxSummary),
    "approval.link": (ApprovalLinkParams, ApprovalLinkResult),
    "passkey.begin": (Empty, PasskeyBeginResult),
    "passkey.list": (Empty, PasskeyListResult),
    "passkey.remove": (PasskeyRemoveParams, PasskeyListResult),
    "audit.verify": (Empty, AuditVerifyResult),
    "mcp.attach": (McpAttachParams, McpAttachResult),
    "mcp.detach": (McpDetachParams, Empty),
}
