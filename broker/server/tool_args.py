"""The base of every MCP tool's arguments model (unknown fields are refused), and the wire's
limits as argument types, so each tool's published inputSchema carries them.

Rules:
- A tool argument that becomes a wire params field has that field's limits (max length, max
  count, pattern): the tool refuses the value itself, naming its own argument, before a wire
  model could refuse it under the wire's name (tests/test_tool_limits.py walks every tool).
- Free of the MCP SDK, so the operations tools run (`tool_operations`) load without it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from broker.wire.limits import FIELD_NAME_PATTERN, NAME_MAX, SPACE_PATTERN, TAG_MAX, VALUE_MAX


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


Value = Annotated[str, Field(max_length=VALUE_MAX)]
Space = Annotated[str, Field(pattern=SPACE_PATTERN)]
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX)]
FieldName = Annotated[str, Field(pattern=FIELD_NAME_PATTERN)]
Tag = Annotated[str, Field(max_length=TAG_MAX)]
Tags = Annotated[list[Name], Field(max_length=64)]
Fields = Annotated[dict[str, Value], Field(max_length=64)]
Url = Annotated[str, Field(max_length=2048)]
