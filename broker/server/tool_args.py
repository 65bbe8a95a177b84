"""The base of every MCP tool's arguments model: unknown fields are refused.

Free of the MCP SDK, so the operations tools run (`tool_operations`) load without it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
