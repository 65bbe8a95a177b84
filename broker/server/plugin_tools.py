"""The `install_plugin` MCP tool: an agent proposes enabling an installed plugin distribution.

"Install" is the seed's name; nothing is installed. The tool finds the distribution through
`importlib.metadata`, previews its `apm.plugins` entry points, and on commit adds them to the
enabled list (`broker.plugin_state`). It never downloads, installs or imports code.

Rules:
- Always two-phase and always the owner's decision (`apm tx approve`, master password),
  whatever approval policy the session has: a plugin runs code as the person.
- The preview names the distribution, its version and every entry point it would enable.
"""

from __future__ import annotations

from importlib import metadata

from pydantic import BaseModel, Field

from broker.plugin_state import read_enabled, write_enabled
from broker.wire.errors import EntryNotFound, InvalidParameters

from .context import Context
from .operations import Rule, tool_operation
from .planners import Plan, TxArgs
from .tool_base import ToolSpec
from .write_tools import WriteOut, two_phase

GROUP = "apm.plugins"
BUILTIN_DIST = "apm-broker"


class InstallPluginArgs(TxArgs):
    distribution: str | None = Field(
        default=None,
        max_length=200,
        description="name of an installed Python distribution declaring apm.plugins entry points",
    )


class PluginEnableParams(BaseModel):
    distribution: str
    version: str
    names: list[str]


class PluginEnableResult(BaseModel):
    enabled: list[str]


def _plugins_of(name: str) -> tuple[str, str, list[tuple[str, str]]]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise EntryNotFound(
            "no installed distribution by that name",
            hint="apm never installs code: the person installs it (pip) into apm's environment",
            data={"distribution": name[:200]},
        ) from None
    real = dist.metadata["Name"] or name
    if real.lower().replace("_", "-") == BUILTIN_DIST:
        raise InvalidParameters("apm's built-in plugins are always enabled")
    eps = sorted((ep.name, ep.value) for ep in dist.entry_points if ep.group == GROUP)
    if not eps:
        raise InvalidParameters(
            "that distribution declares no apm.plugins entry points",
            data={"distribution": real[:200]},
        )
    return real, dist.version or "?", eps


async def _plan_install(ctx: Context, a: InstallPluginArgs) -> Plan:
    if not a.distribution:
        raise InvalidParameters("distribution is required", data={"fields": ["distribution"]})
    name, version, eps = _plugins_of(a.distribution)
    already = read_enabled()
    lines = [f"+ enable plugin distribution {name} {version} (already installed; nothing is "]
    lines[0] += "downloaded or installed)"
    lines += [f"  {n} -> {target}" + ("  (enabled)" if n in already else "") for n, target in eps]
    lines.append("  its code will run inside apm as you: only the owner can approve this")
    return Plan(
        method="plugin.enable",
        params=PluginEnableParams(distribution=name, version=version, names=[n for n, _ in eps]),
        preview="\n".join(lines),
        owner_only=True,
    )


# owner-approved whatever the session's policy: the planner marks its transaction `owner`
ENABLE = Rule(unlocked=True, scope="write", mutating=True, audit="change")


@tool_operation(
    "plugin.enable", PluginEnableParams, PluginEnableResult, ENABLE, ("install_plugin",)
)
async def execute_enable(ctx: Context, p: PluginEnableParams) -> PluginEnableResult:
    _, version, eps = _plugins_of(p.distribution)
    if version != p.version or sorted(n for n, _ in eps) != sorted(p.names):
        raise InvalidParameters(
            "the distribution changed since the preview; nothing was enabled",
            hint="preview install_plugin again",
        )
    write_enabled(read_enabled() | set(p.names))
    ctx.state.record("plugin.enabled", ctx, distribution=p.distribution, names=",".join(p.names))
    return PluginEnableResult(enabled=p.names)


PLUGIN_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="install_plugin",
        title="Propose enabling an installed apm plugin (two-phase, owner approves)",
        description=(
            "Propose enabling the apm.plugins entry points (importers, notifiers, entry types) "
            "of a Python distribution that is already installed in apm's environment. Nothing "
            "is downloaded or installed. First call without tx_id: a preview listing what "
            "would be enabled, and a tx_id. The owner must approve with "
            '"apm tx approve TX_ID" whatever this session\'s policy; then call again with '
            "{tx_id, approve: true}."
        ),
        scope="write",
        args=InstallPluginArgs,
        out=WriteOut,
        run=two_phase("install_plugin", InstallPluginArgs, _plan_install),
        read_only=False,
        idempotent=False,
    ),
)
