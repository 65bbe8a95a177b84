"""The shape every MCP tool shares: validated arguments, a spec with scope and annotations.

Rules:
- `scope` only decides which tools a session is shown (tools/list). Whether a call may run is
  decided by the gate alone (`dispatch.invoke`): a tool is one operation (`op`), or its
  runner reaches invoke before it reads anything (tests/test_gate.py plants a bypass).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import mcp.types as types
from pydantic import BaseModel

from .context import Context
from .tool_args import Args

__all__ = ["Args", "Run", "Shaped", "ToolSpec"]


@dataclass(frozen=True, slots=True)
class Shaped:
    """A runner's answer already in its JSON shape: `doc` is what the output model's
    `model_dump(mode="json")` gives and `json` its compact text (the hot path's get_entry
    skips building and dumping an output model). Never changed after it is built."""

    doc: dict[str, Any]
    json: str


Run = Callable[[Context, Any], Awaitable[BaseModel | Shaped]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    scope: str
    args: type[Args]
    out: type[BaseModel]
    # either the operation the tool runs (its rule, checked by the gate, decides who may; the
    # tool validates its arguments as the operation's params and shapes nothing else) ...
    op: str | None = None
    # ... or a runner that maps arguments to operations it runs through the gate and shapes
    # their answers (a tool with several operations, or output the operation does not give)
    run: Run | None = None
    read_only: bool = True
    destructive: bool = False
    idempotent: bool = True
    grantable: bool = False  # a session without `scope` may use it on entries it holds a grant for
    # where its operations' params name a value otherwise than its arguments: (params path,
    # argument), so a refusal names the argument (`secrets.password` -> `field`)
    renamed: tuple[tuple[str, str], ...] = ()

    def argument_path(self, path: str) -> str:
        """A params path of a refusal (`data.fields`) as this tool's argument."""
        for prefix, argument in self.renamed:
            if path == prefix or path.startswith(prefix + "."):
                return argument
        return path

    def to_mcp(self) -> types.Tool:
        return types.Tool(
            name=self.name,
            title=self.title,
            description=self.description,
            input_schema=self.args.model_json_schema(),
            output_schema=self.out.model_json_schema(),
            annotations=types.ToolAnnotations(
                title=self.title,
                read_only_hint=self.read_only,
                destructive_hint=self.destructive,
                idempotent_hint=self.idempotent,
                open_world_hint=False,
            ),
        )
