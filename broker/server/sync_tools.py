"""MCP tools for synced spaces: `cloud_sync` (write scope: status, sync now) and `cloud_config`
(admin: show the configuration; a change is a transaction only the owner can approve).

Rules:
- Nothing here returns a key, a join code or a client key's contents: configuration shows
  endpoints, file paths, space names/ids and device ids.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.wire.errors import InternalError, InvalidParameters
from broker.wire.protocol import Empty, SyncStatusResult, SyncTls

from . import sync_service
from .context import Context
from .dispatch import invoke
from .operations import OPERATIONS, TOOL_OPERATIONS, Rule, tool_operation
from .planners import Plan, TxArgs
from .tool_base import Args, ToolSpec
from .write_tools import WriteOut, two_phase


class CloudSyncArgs(Args):
    action: Literal["status", "sync_now"] = "status"


class CloudSyncOut(SyncStatusResult):  # the wire's sync.status result
    pass


class CloudConfigArgs(TxArgs):
    action: Literal["show", "set_endpoints"] = "show"
    endpoints: list[str] | None = Field(default=None, min_length=1, max_length=16)
    tls: SyncTls | None = None


class CloudConfigOut(BaseModel):
    configured: bool
    device: str | None = None
    endpoints: list[str] = Field(default_factory=list)
    tls: dict[str, Any] = Field(default_factory=dict)
    spaces: dict[str, str] = Field(default_factory=dict)  # name -> space id
    change: WriteOut | None = None


class SyncConfigureParams(BaseModel):
    endpoints: list[str]
    tls: SyncTls | None  # None: keep the TLS files configured now


# the tool calls are audited by their caller; a session needs `write` to see sync status
SYNC_TOOL = Rule(unlocked=True, scope="write", audit="none")
SYNC_ADMIN_TOOL = Rule(unlocked=True, scope="admin", audit="none")


@tool_operation("sync.overview", CloudSyncArgs, CloudSyncOut, SYNC_TOOL, ("cloud_sync",))
async def _cloud_sync(ctx: Context, a: CloudSyncArgs) -> CloudSyncOut:
    op = OPERATIONS["sync.now" if a.action == "sync_now" else "sync.status"]
    res = await invoke(ctx, op, Empty())  # the operation's own rule, as on the wire
    return CloudSyncOut(**res.model_dump())


def _show(ctx: Context) -> CloudConfigOut:
    cfg = ctx.state.cache.get().extra.get(sync_service.EXTRA_KEY)
    if not isinstance(cfg, dict):
        return CloudConfigOut(configured=False)
    return CloudConfigOut(
        configured=True,
        device=cfg["device"]["id"],
        endpoints=list(cfg["endpoints"]),
        tls=dict(cfg.get("tls", {})),
        spaces={name: sc["id"] for name, sc in cfg.get("spaces", {}).items()},
    )


async def _plan_config(ctx: Context, a: CloudConfigArgs) -> Plan:
    if not a.endpoints:
        raise InvalidParameters("set_endpoints needs endpoints", data={"fields": ["endpoints"]})
    tls = a.tls.model_dump() if a.tls is not None else {}
    preview = "change the sync cluster:\n" + "\n".join(
        [f"  endpoint: {e}" for e in a.endpoints]
        + [f"  {k}: {v}" for k, v in tls.items() if v]
        + ([] if a.tls is not None else ["  (TLS files unchanged)"])
    )
    return Plan(
        method="sync.configure",
        params=SyncConfigureParams(endpoints=a.endpoints, tls=a.tls),
        preview=preview,
        owner_only=True,
    )


_config_change = two_phase("cloud_config", CloudConfigArgs, _plan_config)


# owner-approved whatever the session's policy: the planner marks its transaction `owner`
CONFIGURE = Rule(unlocked=True, scope="admin", mutating=True, audit="change")


@tool_operation("sync.configure", SyncConfigureParams, CloudConfigOut, CONFIGURE, ("cloud_config",))
async def _execute_configure(ctx: Context, p: SyncConfigureParams) -> CloudConfigOut:
    svc = sync_service.service(ctx.state)
    vault = ctx.state.cache.get()

    def work() -> None:
        cfg = svc.config(vault)
        if cfg is None:
            raise InvalidParameters(
                "this vault syncs no space", hint='the owner sets one up with "apm sync init"'
            )
        tls = p.tls.model_dump() if p.tls is not None else dict(cfg.get("tls", {}))
        cfg = svc._base_config(vault, p.endpoints, tls)
        svc.stop()
        svc._save_config(vault, cfg)
        svc.start(vault)

    async with ctx.state.write_lock:
        await ctx.state.io(work)
    ctx.state.record("sync.configure", ctx, endpoints=len(p.endpoints))
    return _show(ctx)


@tool_operation("sync.config", Empty, CloudConfigOut, SYNC_ADMIN_TOOL, ())
async def _config(ctx: Context, p: Empty) -> CloudConfigOut:
    return _show(ctx)


async def _cloud_config(ctx: Context, a: CloudConfigArgs) -> CloudConfigOut:
    change = None if a.action == "show" and a.tx_id is None else await _config_change(ctx, a)
    out = await invoke(ctx, TOOL_OPERATIONS["sync.config"], Empty())  # admin, by the gate
    if not isinstance(out, CloudConfigOut):
        raise InternalError(f"sync.config answered {type(out).__name__}")
    out.change = change
    return out


SYNC_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="cloud_sync",
        title="Sync status, sync now",
        description=(
            "Synced spaces (shared through etcd): endpoints and their health, last applied "
            "revision, lag, members, pending joins and refused records; action sync_now "
            "re-reads the cluster."
        ),
        scope="write",
        args=CloudSyncArgs,
        out=CloudSyncOut,
        op="sync.overview",
        read_only=False,
    ),
    ToolSpec(
        name="cloud_config",
        title="Sync configuration",
        description=(
            "Show the sync configuration (endpoints, TLS file paths, synced spaces, this "
            "device). action set_endpoints previews a change; only the owner can approve it "
            '("apm tx approve TX"), then commit with {"tx_id": ..., "approve": true}.'
        ),
        scope="admin",
        args=CloudConfigArgs,
        out=CloudConfigOut,
        run=_cloud_config,
        read_only=False,
        idempotent=False,
    ),
)
