"""URL-mode elicitation (#17.1): the approval page's link goes to the AI client, through the
real shim and the SDK's stdio client (legacy era: the one with server-to-client requests), when
the client declares URL elicitation; the client's answer decides nothing.
"""

from __future__ import annotations

from typing import Any

import mcp.types as mt
import pytest

from . import test_approve_page_browser as page
from .mcp_client import ok_of, shim_client
from .test_approve_page_browser import VALUE, WHY, World

pytestmark = pytest.mark.slow
world = page.world  # a real broker serving the page on its own loopback port

TIMEOUT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def recorder(seen: list[Any], action: str = "accept") -> Any:
    async def respond(ctx: Any, params: Any) -> mt.ElicitResult:
        seen.append(params)
        return mt.ElicitResult(action=action)  # type: ignore[arg-type]

    return respond


def _entry(world: World, name: str) -> None:
    if name not in world.names():
        secrets = {"key": {"value": VALUE}}
        world.wire("entry.add", {"type": "api_key", "name": name, "secrets": secrets})


@pytest.mark.anyio
async def test_a_request_sends_its_page_link_to_a_client_that_supports_url_elicitation(
    world: World,
) -> None:
    _entry(world, "elicit-me")
    token = world.session(approve="agent", scope="read")
    seen: list[Any] = []
    async with shim_client(
        world.home, token, "legacy", TIMEOUT, elicitation_callback=recorder(seen, "decline")
    ) as client:
        args = {"entry": "elicit-me", "duration_minutes": 5, "justification": WHY}
        body = ok_of(await client.call_tool("request_access", args))
    assert body["state"] == "pending"  # declining the prompt decided nothing
    listed = world.wire("request.list", {"pending": True})["requests"]
    url = next(r["page_url"] for r in listed if r["id"] == body["request_id"])
    assert len(seen) == 1
    assert seen[0].mode == "url" and seen[0].url == url
    assert url.startswith("http://localhost:") and "/approve/" in url
    assert VALUE not in seen[0].message


@pytest.mark.anyio
async def test_a_write_awaiting_the_owner_sends_the_page_link_when_the_agent_commits(
    world: World,
) -> None:
    token = world.session(approve="owner", scope="write")
    seen: list[Any] = []
    async with shim_client(
        world.home, token, "legacy", TIMEOUT, elicitation_callback=recorder(seen)
    ) as client:
        args = {"type": "api_key", "name": "elicit-write", "secrets": {"key": VALUE}}
        tx = ok_of(await client.call_tool("add_entry", args))["tx_id"]
        assert seen == []  # the preview asks nobody
        out = ok_of(await client.call_tool("add_entry", {"tx_id": tx, "approve": True}))
    assert out["status"] == "pending_owner_approval"
    link = world.wire("approval.link", {"kind": "tx", "id": tx}, token=None)
    assert [(p.mode, p.url) for p in seen] == [("url", link["url"])]
    assert "elicit-write" not in world.names()  # accepting the prompt approved nothing
    world.wire("tx.deny", {"tx_id": tx})


@pytest.mark.anyio
async def test_a_client_without_elicitation_is_not_asked_and_the_request_still_opens(
    world: World,
) -> None:
    _entry(world, "elicit-me")
    token = world.session(approve="agent", scope="read")
    async with shim_client(world.home, token, "legacy", TIMEOUT) as client:
        args = {"entry": "elicit-me", "duration_minutes": 5, "justification": WHY}
        assert ok_of(await client.call_tool("request_access", args))["state"] == "pending"
