"""broker/cli/jsonc.py: comments and trailing commas parsed; one member edited in place."""

from __future__ import annotations

import json

import pytest

from broker.cli import jsonc

TRICKY = """{
  // a comment with "quotes" and a , comma
  "url": "http://example.com/*not-a-comment*/ // nor this",
  "esc": "a \\" // still a string",
  "servers": {
    "x": [1, 2,], /* a block
    over lines */
  },
}
"""


def test_comments_and_trailing_commas_parse_and_strings_that_look_like_comments_survive() -> None:
    doc = jsonc.parse(TRICKY)
    assert doc["url"] == "http://example.com/*not-a-comment*/ // nor this"
    assert doc["esc"] == 'a " // still a string'
    assert doc["servers"] == {"x": [1, 2]}


@pytest.mark.parametrize(
    "text",
    [
        TRICKY,
        "{}",
        '{"servers": {}}',
        '{"a": 1}',
        '{\n  "servers": {\n    "b": 2  // c\n  }\n}\n',
        '{"servers": {"a": {"k": [1]}, "b": 2,},}',
    ],
)
def test_setting_then_removing_apm_gives_back_the_same_text(text: str) -> None:
    value = {"command": "/bin/apm-mcp", "args": [], "env": {"K": "v=+/"}}
    with_apm = jsonc.set_member(text, "servers", "apm", value)
    doc = jsonc.parse(with_apm)
    assert doc["servers"]["apm"] == value
    before = jsonc.parse(text)
    assert {k: v for k, v in doc.items() if k != "servers"} == {
        k: v for k, v in before.items() if k != "servers"
    }
    replaced = jsonc.set_member(with_apm, "servers", "apm", {"command": "new"})
    assert jsonc.parse(replaced)["servers"]["apm"] == {"command": "new"}
    back = jsonc.set_member(with_apm, "servers", "apm", None)
    if "servers" in before:
        assert back == text
    assert jsonc.parse(back).get("servers", {}).get("apm") is None


def test_an_error_names_line_and_column() -> None:
    with pytest.raises(jsonc.JsoncError) as err:
        jsonc.parse('{\n  "a": 1\n  "b": 2\n}')
    assert (err.value.line, err.value.column) == (3, 3)


def test_plain_json_is_edited_without_reformatting_the_rest() -> None:
    text = json.dumps({"theme": "dark", "mcpServers": {"other": {"command": "x"}}}, indent=4)
    out = jsonc.set_member(text, "mcpServers", "apm", {"command": "y"})
    assert out.startswith('{\n    "theme": "dark",\n    "mcpServers": {\n        "other": {')
    assert json.loads(out)["mcpServers"] == {"other": {"command": "x"}, "apm": {"command": "y"}}
