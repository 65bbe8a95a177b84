"""Published tool input schemas carry the limits the wire enforces, and a refused value names a
field the tool's schema has (#12.5).

The first test walks every MCP tool and the params model of each operation it runs (the
operation table's `tools`), and fails when a limit of a wire field the tool passes on (max
length, max count, pattern, bounds) is missing from the tool's inputSchema or looser there. The
second calls every tool with one value breaking each published limit and checks the refusal:
INVALID_PARAMETERS, naming that argument, never echoing the value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import broker.server.daemon  # noqa: F401 - declares every operation the real broker serves
from broker.server import mcp_tools
from broker.server.operations import OPERATIONS, TOOL_OPERATIONS
from broker.wire.protocol import AuditListParams, EntryGetParams, EntryRef, SyncInitParams

from .conftest import PASSWORD
from .twin import Twin, twin_of

# JSON Schema keywords that limit a value, and which way a tool's may be stricter
UPPER = ("maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties")
LOWER = ("minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties")
LIMITS = (*UPPER, *LOWER, "pattern")

# Every tool names an entry `entry`; the wire calls it `ref`.
RENAMED = {"ref": "entry"}
# Per tool and operation: a wire path the tool names otherwise, or None where the tool takes no
# such argument (its planner fills the value, within the wire's limits).
PATHS: dict[tuple[str, str], dict[str, str | None]] = {
    # a tool's secret is a plain string; the wire wraps it as {"value": ...}
    ("add_entry", "entry.add"): {"secrets.*.value": "secrets.*"},
    ("edit_entry", "entry.edit"): {"secrets.*.value": "secrets.*"},
    # a new entry named `entry` with one generated secret (length <= 128) in field `field`
    ("generate_password", "entry.add"): {
        "name": "entry",
        "tags": None,
        "url": None,
        "notes": None,
        "fields": None,
        "secrets": None,
        "secrets.*.value": None,
    },
    # one generated secret into an existing entry: nothing else changes
    ("generate_password", "entry.edit"): {
        "new_name": None,
        "move_to": None,
        "add_tags": None,
        "remove_tags": None,
        "url": None,
        "notes": None,
        "fields": None,
        "secrets": None,
        "secrets.*.value": None,
        "remove_fields": None,
    },
}
# A tool operation (no wire method) takes the tool's arguments as its params, so comparing the
# two proves nothing: compare with the wire method that takes the same values.
MIRRORS: dict[str, type[BaseModel]] = {
    "request.open": EntryGetParams,  # an entry (and field) to ask for
    "entry.versions": EntryRef,
    "audit.search": AuditListParams,
    "sync.configure": SyncInitParams,
}
MIRROR_PATHS: dict[tuple[str, str], dict[str, str | None]] = {
    # the cluster's spaces are configured by the owner (apm sync init), never by a tool
    ("cloud_config", "sync.configure"): {"space": None},
}


def limits(schema: dict[str, Any], keys: tuple[str, ...] = LIMITS) -> dict[str, dict[str, Any]]:
    """Every limit in a JSON Schema by path: `a.b` property, `a[]` items, `a.*` dict values."""
    defs = schema.get("$defs", {})
    out: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        for alt in node.get("anyOf", []):  # Optional[...]: the non-null branch
            walk(alt, path)
        found = {k: node[k] for k in keys if k in node}
        if found:
            out.setdefault(path, {}).update(found)
        for name, prop in node.get("properties", {}).items():
            walk(prop, f"{path}.{name}" if path else name)
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], path + ".*")

    walk(schema, "")
    return out


def _tool_path(path: str, renames: dict[str, str | None]) -> str | None:
    if path in renames:
        return renames[path]
    head, dot, rest = path.partition(".")
    if head in renames:  # a renamed or unexposed parent covers its children
        parent = renames[head]
        return None if parent is None else parent + dot + rest
    return RENAMED.get(head, head) + dot + rest


def _pairs() -> Iterator[tuple[str, str, type[BaseModel], dict[str, str | None]]]:
    for op in [*OPERATIONS.values(), *TOOL_OPERATIONS.values()]:
        for tool in op.tools:
            if op.name in MIRRORS:
                yield tool, op.name, MIRRORS[op.name], MIRROR_PATHS.get((tool, op.name), {})
            else:
                yield tool, op.name, op.params, PATHS.get((tool, op.name), {})


def _gaps(wire: dict[str, Any], tool: dict[str, Any]) -> list[str]:
    gaps = []
    for key, limit in wire.items():
        have = tool.get(key)
        if have is None:
            gaps.append(f"{key} {limit!r} missing")
        elif (key in UPPER and have > limit) or (key in LOWER and have < limit):
            gaps.append(f"{key} {have!r} looser than the wire's {limit!r}")
        elif key == "pattern" and have != limit:
            gaps.append(f"pattern {have!r} is not the wire's {limit!r}")
    return gaps


def test_every_tool_schema_carries_the_limits_of_the_wire_params_it_fills() -> None:
    covered: set[str] = set()
    compared = 0
    problems: list[str] = []
    for tool, op_name, params, renames in _pairs():
        covered.add(tool)
        schema = mcp_tools.TOOLS_BY_NAME[tool].to_mcp().input_schema
        published = limits(schema)
        for path, wire_limits in limits(params.model_json_schema()).items():
            target = _tool_path(path, renames)
            if target is None:
                continue  # declared above: the tool never takes this value
            compared += 1
            for gap in _gaps(wire_limits, published.get(target, {})):
                problems.append(f"{tool} ({op_name}) {target} <- {params.__name__}.{path}: {gap}")
    assert not problems, "\n".join(problems)
    assert compared > 50
    # every tool is walked: each runs at least one operation of the table
    assert covered == set(mcp_tools.TOOLS_BY_NAME), set(mcp_tools.TOOLS_BY_NAME) - covered


def test_the_walk_finds_a_wire_limit_a_tool_schema_lacks() -> None:
    """The check above can fail: a wire field's pattern the tool does not publish is a gap."""
    wire = limits(EntryGetParams.model_json_schema())
    loose = {"properties": {"entry": {"type": "string"}, "space": {"type": "string"}}}
    published = limits(loose)
    gaps = {p: _gaps(lim, published.get(_tool_path(p, {}) or "", {})) for p, lim in wire.items()}
    assert gaps["space"] and gaps["ref"] and gaps["field"]
    assert _gaps({"maxLength": 200}, {"maxLength": 300}) and not _gaps(
        {"maxLength": 200}, {"maxLength": 100}
    )


# ---------------------------------------------------------------------- refusals


def _breaking(limit: dict[str, Any]) -> list[Any]:
    """One value breaking each of `limit`'s keywords."""
    out: list[Any] = []
    if "maxLength" in limit:
        out.append("z" * (limit["maxLength"] + 1))
    if "pattern" in limit:
        out.append("not a valid value!")  # a space and "!" match none of the wire's patterns
    if limit.get("minLength", 0) >= 1:
        out.append("")
    if "maximum" in limit:
        out.append(limit["maximum"] + 1)
    if "minimum" in limit:
        out.append(limit["minimum"] - 1)
    if "maxItems" in limit:
        out.append(["t"] * (limit["maxItems"] + 1))
    if limit.get("minItems", 0) >= 1:
        out.append([])
    if "maxProperties" in limit:
        out.append({f"k{i}": "v" for i in range(limit["maxProperties"] + 1)})
    if "enum" in limit:
        out.append("not-one-of-them")
    assert out, f"no value breaks {limit}"
    return out


def _wrap(path: str, leaf: Any) -> tuple[str, Any]:
    """The argument (top-level property, value) that puts `leaf` at `path`: `a`, `a[]` (one
    item), `a.*` (a dict value, under a real field's name) or `a.b`."""
    if path.endswith("[]") and "." not in path:
        return path[:-2], [leaf]
    head, _, rest = path.partition(".")
    if not rest:
        return head, leaf
    assert "." not in rest and "[]" not in rest, f"add a case for {path}"
    return head, {"password" if rest == "*" else rest: leaf}


def _cases() -> Iterator[tuple[str, str, str, Any]]:
    for spec in mcp_tools.TOOLS:
        schema = spec.to_mcp().input_schema
        for path, limit in limits(schema, (*LIMITS, "enum")).items():
            if not path:
                continue
            for leaf in _breaking(limit):
                arg, value = _wrap(path, leaf)
                yield spec.name, path, arg, value


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with twin_of(tmp_path, PASSWORD) as t:
        t.add("db", "s3cret-value")
        yield t


def test_the_refusal_cases_cover_every_write_tool_and_the_oversized_secret() -> None:
    cases = {(tool, path) for tool, path, _, _ in _cases()}
    write_tools = {t.name for t in mcp_tools.TOOLS if not t.read_only}
    assert write_tools <= {tool for tool, _ in cases}, write_tools - {t for t, _ in cases}
    assert {("add_entry", "secrets.*"), ("edit_entry", "secrets.*")} <= cases
    assert len(cases) > 60
    assert sum(1 for _ in _cases()) > 100


@pytest.mark.anyio
async def test_a_value_breaking_a_published_limit_is_refused_naming_that_tool_argument(
    twin: Twin,
) -> None:
    _, rec = twin.session("admin")
    for tool, path, arg, value in _cases():
        body = await twin.body(rec, tool, {arg: value})
        where = f"{tool} {path}"
        assert body["error"] and body["code"] == "INVALID_PARAMETERS", (where, body)
        schema = mcp_tools.TOOLS_BY_NAME[tool].to_mcp().input_schema
        named = {f.split(".")[0] for f in body["data"]["fields"]}
        assert arg in named, (where, body["data"]["fields"])
        assert named <= set(schema["properties"]), (where, named)
        assert f"{arg}" in body["message"], (where, body["message"])
        text = repr(body)
        if isinstance(value, str) and len(value) > 100:
            assert value[:100] not in text, where  # the refused value is never echoed
        if isinstance(value, dict) and len(str(value)) > 100:
            assert "z" * 100 not in text, where


@pytest.mark.anyio
@pytest.mark.parametrize("tool", ["add_entry", "edit_entry"])
async def test_an_oversized_secret_names_the_tools_secrets_field_not_value(
    twin: Twin, tool: str
) -> None:
    _, rec = twin.session("admin")
    big = "S" * (64 * 1024 + 1)
    args: dict[str, Any] = {"secrets": {"password": big}}
    args |= {"type": "login", "name": "n"} if tool == "add_entry" else {"entry": "db"}
    body = await twin.body(rec, tool, args)
    assert body["error"] and body["code"] == "INVALID_PARAMETERS"
    assert body["data"]["fields"] == ["secrets.password"]
    assert "secrets.password" in body["message"]
    assert "invalid parameters: value" not in body["message"]
    assert "S" * 64 not in repr(body)
    # nothing was previewed: no transaction holds the value
    assert not twin.state.txs.listing(rec.accessor, None)


# Values every published limit allows, refused by the vault or a planner (at the preview or at
# the commit): each refusal still names the tool's own argument.
SEMANTIC_REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("add_entry", {"type": "login", "name": "a", "fields": {"bad key!": "v"}}, "fields"),
    ("add_entry", {"type": "login", "name": "b", "fields": {"foo": "v"}}, "fields"),
    ("add_entry", {"type": "login", "name": "c", "fields": {"password": "v"}}, "fields"),
    ("add_entry", {"type": "login", "name": "d"}, "secrets"),  # the required secret missing
    ("add_entry", {"type": "nosuchtype", "name": "e"}, "type"),
    ("add_entry", {"type": "login", "name": "f\x01", "secrets": {"password": "p"}}, "name"),
    ("add_entry", {"type": "login", "name": "g", "tags": ["t\x01"],
                   "secrets": {"password": "p"}}, "tags"),
    ("add_entry", {"type": "totp", "name": "h", "secrets": {"secret": "not base32!"}}, "secrets"),
    ("edit_entry", {"entry": "db", "remove_fields": ["password"]}, "remove_fields"),
    ("edit_entry", {"entry": "db", "new_name": "x\x01"}, "new_name"),
    ("edit_entry", {"entry": "db", "add_tags": ["t\x01"]}, "add_tags"),
    ("edit_entry", {"entry": "db", "fields": {"nope": "v"}}, "fields"),
    ("edit_entry", {"entry": "db", "secrets": {"nope": "v"}}, "secrets"),
    ("generate_password", {"entry": "db", "field": "nope"}, "field"),
    ("generate_password", {"entry": "new1", "type": "login", "field": "bad key!"}, "field"),
    ("generate_password", {"entry": "new2", "type": "nosuchtype"}, "type"),
    ("request_access", {"entry": "db", "field": "nope", "duration_minutes": 5,
                        "justification": "to run the migration"}, "field"),
    ("request_access", {"entry": "db", "duration_minutes": 10_000,
                        "justification": "to run the migration"}, "duration_minutes"),
]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(("tool", "args", "argument"), SEMANTIC_REFUSALS)
async def test_a_value_the_vault_refuses_is_named_as_the_tools_argument(
    twin: Twin, tool: str, args: dict[str, Any], argument: str
) -> None:
    _, rec = twin.session("admin")
    body = await twin.body(rec, tool, args)
    if not body["error"] and body.get("tx_id"):  # refused when the change is made
        body = await twin.body(rec, tool, {"tx_id": body["tx_id"], "approve": True})
    assert body["error"] and body["code"] == "INVALID_PARAMETERS", body
    schema = mcp_tools.TOOLS_BY_NAME[tool].to_mcp().input_schema
    named = [f.split(".")[0] for f in body["data"]["fields"]]
    assert named == [argument], body["data"]
    assert set(named) <= set(schema["properties"])
