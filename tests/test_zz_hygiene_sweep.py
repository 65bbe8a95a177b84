"""Runs last (file order): the whole suite left no secret in plaintext anywhere it looked."""

from __future__ import annotations

from pathlib import Path

from .conftest import HOMES, SECRETS, SWEEP_HITS, register_secret, sweep


def test_no_secret_value_password_or_token_was_found_in_plaintext_after_the_suite() -> None:
    if HOMES:  # the sweep had something to look for: it is not vacuous
        assert SECRETS, "tests ran against a broker, yet no secret was registered for the sweep"
    assert SWEEP_HITS == []


def test_the_sweep_finds_a_planted_secret_in_any_of_its_forms(tmp_path: Path) -> None:
    planted = "planted-Secret-Value-42"
    register_secret(planted)
    try:
        (tmp_path / "log.txt").write_text(f"oops {planted} leaked")
        (tmp_path / "hex.bin").write_bytes(planted.encode().hex().encode())
        assert len(sweep(tmp_path)) == 2
    finally:
        SECRETS.discard(planted)
