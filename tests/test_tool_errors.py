"""What a model reads in an apm tool error: tools to call, not CLI commands; rules with limits."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from broker.server import mcp_tools
from broker.server.request_tools import RequestAccessArgs
from broker.wire.errors import ERRORS, EntryNotFound

TOOL_NAMES = {t.name for t in mcp_tools.TOOLS}


def text_of(exc: BaseException) -> str:
    return mcp_tools.error_outcome(exc).text


def test_entry_not_found_says_call_search_entries_not_run_apm_ls() -> None:
    text = text_of(EntryNotFound())
    assert "call search_entries" in text
    assert "apm ls" not in text and "apm search" not in text


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_no_error_tells_the_model_to_run_a_cli_command_itself(code: str) -> None:
    hint = mcp_tools.model_hint(code, ERRORS[code].default_hint) or ""
    assert not re.match(r'(?i)(run|use|list them with) "apm ', hint), hint
    if '"apm ' in hint:  # a command only the person can run is named as theirs
        assert "person" in hint or "owner" in hint, hint
    for name in re.findall(r"call ([a-z]+_[a-z_]+)", hint):
        assert name in TOOL_NAMES, (code, name)


def test_a_short_justification_states_the_limit_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as err:
        RequestAccessArgs.model_validate(
            {"entry": "db", "duration_minutes": 0, "justification": "secret-ish"[:5]}
        )
    outcome = mcp_tools.error_outcome(err.value)
    assert outcome.structured["code"] == "INVALID_PARAMETERS"
    assert "justification: String should have at least 10 characters" in outcome.text
    assert "duration_minutes: Input should be greater than or equal to 1" in outcome.text
    assert "secre" not in outcome.text
