"""The mcp SDK's client against apm, for the end-to-end tests: the stdio client spawning the
real `apm-mcp` shim, and the helper that unwraps the exception groups anyio raises so a test
failure names the one error that happened.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mcp.types as mt
from mcp import Client, StdioServerParameters

from broker.server.mcp_tools import ERROR_META

SHIM = Path(sys.executable).parent / "apm-mcp"
# a raw JSON-RPC `initialize`, for the tests that speak to the shim without the SDK
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "pytest", "version": "1"},
    },
}


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Re-raise a group holding a single error as that error."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = leaves(group)
        if len(found) == 1:
            raise found[0] from group
        raise


@contextlib.asynccontextmanager
async def shim_client(
    home: Path, token: str, mode: str, timeout: float, **kw: Any
) -> AsyncIterator[Client]:
    """The SDK's stdio client running the real shim with `token`, against the broker of `home`."""
    params = StdioServerParameters(
        command=str(SHIM), args=[], env={"APM_HOME": str(home), "APM_EPHEMERAL_ID": token}
    )
    with unwrapped():
        async with Client(params, mode=mode, read_timeout_seconds=timeout, **kw) as client:
            yield client


# ------------------------------------------------------------------ reading tool results


def ok_of(result: mt.CallToolResult) -> dict[str, Any]:
    """The structured content of a successful tool result (asserting it is one)."""
    assert not result.is_error, f"tool failed: {result.structured_content}"
    body = result.structured_content
    assert isinstance(body, dict)
    return body


def error_body(result: mt.CallToolResult | dict[str, Any]) -> dict[str, Any]:
    """{code, message, hint, data} of a tool error, from `_meta` (SDK model or wire dict).

    Error results carry no structuredContent: it would not match the tool's outputSchema,
    which TypeScript clients check also on errors.
    """
    if isinstance(result, mt.CallToolResult):
        is_error, structured, meta = result.is_error, result.structured_content, result.meta
    else:
        is_error, structured, meta = (
            result.get("isError"),
            result.get("structuredContent"),
            result.get("_meta"),
        )
    assert is_error, f"expected a tool error, got {structured}"
    assert structured is None, f"an error result carries structuredContent: {structured}"
    body = (meta or {}).get(ERROR_META)
    assert isinstance(body, dict), f"no {ERROR_META} in the error's _meta: {meta}"
    return dict(body)


def error_of(result: mt.CallToolResult) -> dict[str, Any]:
    """The {code, message, hint} of a tool error (asserting it is one); its text names the code."""
    body = error_body(result)
    assert set(body) >= {"code", "message", "hint"}
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert body["code"] in text, text  # what the model reads
    return body


def whole(result: mt.CallToolResult) -> str:
    """Everything a client receives in a tool result, as one string."""
    return result.model_dump_json(by_alias=True)


async def request_access(
    client: Client, entry: str, justification: str, minutes: int = 5, **extra: Any
) -> str:
    """The agent's side of the just-in-time flow: request_access for `entry` (with `extra`
    arguments: access, field), asserted pending; its request id. The person then answers with
    `apm request approve|deny ID`, and the agent retries or follows the request."""
    args = {"entry": entry, "duration_minutes": minutes, "justification": justification, **extra}
    body = ok_of(await client.call_tool("request_access", args))
    assert body["state"] == "pending", body
    return str(body["request_id"])


async def tool_names(client: Client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}
