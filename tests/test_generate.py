"""`apm generate` and `apm add --generate` use the MCP tool's generator."""

from __future__ import annotations

import string

import pytest

from broker.wire.errors import InvalidParameters
from broker.wire.passwords import SYMBOLS, generate_password

from .conftest import Apm, Broker


def test_generator_uses_every_class_asked_for_and_only_those() -> None:
    for _ in range(50):
        value = generate_password(12, symbols=False)
        assert len(value) == 12
        assert any(c in string.ascii_lowercase for c in value)
        assert any(c in string.ascii_uppercase for c in value)
        assert any(c in string.digits for c in value)
        assert not any(c in SYMBOLS for c in value)


def test_generator_refuses_no_classes_and_lengths_out_of_range() -> None:
    with pytest.raises(InvalidParameters):
        generate_password(lowercase=False, uppercase=False, digits=False, symbols=False)
    with pytest.raises(InvalidParameters):
        generate_password(7)
    with pytest.raises(InvalidParameters):
        generate_password(129)


def test_the_mcp_tool_generates_through_the_same_function(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.server import planners

    seen: list[int] = []

    def fake(length: int, **kw: bool) -> str:
        seen.append(length)
        return "x" * length

    monkeypatch.setattr(planners, "generate_password", fake)
    out = planners.generate(planners.GeneratePasswordArgs(entry="e", length=33))
    assert out == "x" * 33
    assert seen == [33]


def test_apm_generate_prints_a_password_of_the_asked_length(apm: Apm) -> None:
    out = apm("generate", "--length", "40", "--no-symbols", check=True).stdout
    value = out.rstrip("\n")
    assert len(value) == 40
    assert value.isalnum()
    other = apm("generate", check=True).stdout.rstrip("\n")
    assert len(other) == 24
    assert other != value


def test_apm_generate_refuses_a_bad_length_with_invalid_parameters(apm: Apm) -> None:
    bad = apm("generate", "--length", "4")
    assert bad.returncode == 10
    assert "length must be between" in bad.stderr
    assert "Traceback" not in bad.stderr
    none = apm("generate", "--no-lowercase", "--no-uppercase", "--no-digits", "--no-symbols")
    assert none.returncode == 10


@pytest.mark.slow
def test_apm_add_generate_stores_a_generated_password(vault: Broker, apm: Apm) -> None:
    added = apm.ok(
        "add", "login", "site", "--field", "username=bob", "--generate", "--length", "31"
    )
    value = apm.ok("get", "site").stdout.rstrip("\n")
    assert len(value) == 31
    assert value not in added.stdout + added.stderr
    apm.ok("add", "custom", "svc", "--generate", "--secret-field", "pin", "--no-symbols")
    pin = apm.ok("get", "svc", "--field", "pin").stdout.rstrip("\n")
    assert len(pin) == 24 and pin.isalnum()
    nofield = apm("add", "custom", "svc2", "--generate", password="correct horse battery staple")
    assert nofield.returncode == 10
