"""The relay contract between the shim and the broker: the wire protocol version, the MCP
frame kinds, and the `apm_status` tool.

Stdlib only: the shim (stdlib + pyzmq) and the broker both import it, so the two can never
disagree, and the broker never imports `shim`. The shim serves `apm_status` while the broker
is unreachable; the broker serves the same definition when the vault is locked or the session
no longer works, so a client never shows "no tools" without a tool that says what to fix.
"""

from __future__ import annotations

from typing import Any

PROTOCOL_VERSION = 1  # the broker wire protocol's version (the envelope's `v`)
MIN_PROTOCOL_VERSION = 1

# A shim attaches once with `mcp.attach` (session token in auth); afterwards MCP JSON-RPC
# messages travel as three-frame messages [MCP_FRAME, conn, payload] in both directions,
# without an envelope, so the relay costs no extra parsing. The broker answers a frame for an
# unknown connection with [MCP_DETACHED, conn, reason-code] and the shim attaches again.
MCP_FRAME = b"mcp"
MCP_DETACHED = b"mcp-detached"

APM_STATUS_TOOL: dict[str, Any] = {
    "name": "apm_status",
    "title": "apm status",
    "description": (
        "Explains why the apm password manager tools are not available right now and the exact "
        "command the person must run to fix it. Call it when other apm tools are missing."
    ),
    "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
    "outputSchema": {
        "type": "object",
        "properties": {
            "ready": {"type": "boolean"},
            "code": {"type": "string"},
            "message": {"type": "string"},
            "hint": {"type": "string"},
        },
        "required": ["ready", "code", "message", "hint"],
    },
    "annotations": {
        "readOnlyHint": True,
        "destructiveHint": False,
        "idempotentHint": True,
        "openWorldHint": False,
    },
}


def status_result(code: str, message: str, hint: str, *, is_error: bool) -> dict[str, Any]:
    """A CallToolResult (wire form) describing the problem and its fix.

    As an error (the answer to another tool while apm is not ready) it has no structuredContent,
    which would not match that tool's outputSchema (TypeScript clients reject the result then);
    {code, message, hint} go in `_meta["apm/error"]`, as on every apm tool error.
    """
    text = f"apm is not ready ({code}): {message}. Ask the person to run: {hint}"
    content = [{"type": "text", "text": text}]
    if is_error:
        error = {"code": code, "message": message, "hint": hint}
        return {"content": content, "isError": True, "_meta": {"apm/error": error}}
    body = {"ready": False, "code": code, "message": message, "hint": hint}
    return {"content": content, "structuredContent": body, "isError": False}
