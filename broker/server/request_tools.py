"""Just-in-time access tools (scope `read`): ask for one entry, follow the decision, and learn
how to use the credential without seeing it. Each runs one operation of `tool_operations`
(a session sees only its own requests; no tool returns a secret value)."""

from __future__ import annotations

from .tool_args import Args
from .tool_base import ToolSpec
from .tool_operations import (
    AccessDetails,
    MyRequestsOut,
    RequestAccessArgs,
    RequestInfo,
    RequestRef,
)

__all__ = ["REQUEST_TOOLS", "RequestAccessArgs"]


REQUEST_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="request_access",
        title="Ask the person for access to one secret",
        description=(
            "Ask the person to let this session use one entry's secret (optionally one field) "
            "for a limited time. Give a specific justification. By default you ask for a use "
            "grant: once approved, get_access_details gives an `apm run` command line that puts "
            "the secret into a command's environment; you never see the value, and "
            'decrypt_entry/get_totp stay refused for that entry. Ask for access="reveal" only '
            "if you must read the value itself. The person approves in their terminal or on "
            "the approval page; follow up with get_request_status, then get_access_details."
        ),
        scope="read",
        args=RequestAccessArgs,
        out=RequestInfo,
        op="request.open",
        read_only=False,
        idempotent=False,
    ),
    ToolSpec(
        name="get_request_status",
        title="Status of an access request",
        description="pending, approved, denied, expired or revoked, with times and the reason.",
        scope="read",
        args=RequestRef,
        out=RequestInfo,
        op="request.status",
    ),
    ToolSpec(
        name="get_access_details",
        title="How to use an approved credential without seeing it",
        description=(
            "For an approved request: the apm:// reference and a ready `apm run` command line "
            "that injects the secret into a command's environment. Never returns the value."
        ),
        scope="read",
        args=RequestRef,
        out=AccessDetails,
        op="request.details",
    ),
    ToolSpec(
        name="list_my_requests",
        title="This session's access requests",
        description="Every access request this session made, with its state.",
        scope="read",
        args=Args,
        out=MyRequestsOut,
        op="request.mine",
    ),
)
