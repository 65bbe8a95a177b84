"""`mcp.attach` / `mcp.detach`: the wire methods a shim uses to open and close its MCP session.

The MCP host itself (and the `mcp` SDK, ~0.5 s to import) loads in the background when the
broker starts; an attach arriving earlier waits for it.
"""

from __future__ import annotations

from broker.wire.errors import InternalError
from broker.wire.protocol import Empty, McpAttachParams, McpAttachResult, McpDetachParams

from .context import Context
from .operations import UNAUDITED, Rule, operation


@operation("mcp.attach", Rule(unlocked=True, scope="read", audit="none"))
async def process_mcp_attach(ctx: Context, p: McpAttachParams) -> McpAttachResult:
    host = await ctx.state.mcp_host()
    if host is None:
        raise InternalError("the MCP host is not available in this broker")
    result: McpAttachResult = await host.attach(ctx, ctx.identity, p)
    return result


@operation("mcp.detach", UNAUDITED)
async def process_mcp_detach(ctx: Context, p: McpDetachParams) -> Empty:
    host = await ctx.state.mcp_host()
    if host is not None:
        conn = host.conns.get(p.conn)
        if conn is not None and conn.identity == ctx.identity:
            await host.detach(p.conn)
    return Empty()
