"""broker.wire.display: the one escaper for untrusted text, and how a secret value is shown."""

from __future__ import annotations

import re
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from broker.wire.display import escape, fingerprint, secret_summary

_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt\\])")


def unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        return {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}.get(code) or chr(int(code[1:], 16))

    return _UNESCAPE.sub(one, text)


def dangerous(ch: str) -> bool:
    return unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"} or (
        unicodedata.category(ch) == "Zs" and ch != " "
    )


def test_the_spoofing_url_of_the_review_becomes_one_visible_line() -> None:
    url = "https://github.com\x1b[2K\x1b[1A\x1b[2K\x1b[1G      tags: +reviewed -"
    shown = escape(url)
    assert "\x1b" not in shown
    assert shown == "https://github.com\\x1b[2K\\x1b[1A\\x1b[2K\\x1b[1G      tags: +reviewed -"


def test_c1_del_bidi_isolates_separators_and_zero_width_characters_are_escaped() -> None:
    hostile = "a\x9b2Jb\x7fc\u202egnp.exe\u2066d\u2069\u2028e\u2029f\u200bg\ufeffh\u00a0i\r\n\t"
    shown = escape(hostile)
    for code in (
        "\\x9b",
        "\\x7f",
        "\\u202e",
        "\\u2066",
        "\\u2069",
        "\\u2028",
        "\\u2029",
        "\\u200b",
        "\\ufeff",
        "\\xa0",
        "\\r",
        "\\n",
        "\\t",
    ):
        assert code in shown
    assert shown.isprintable()


def test_plain_text_and_non_latin_letters_pass_unchanged() -> None:
    for text in ("proddb", "https://example.com/a?b=c", "Zürich café", "пароль", "数据库 🙂"):
        assert escape(text) == text


def test_a_literal_backslash_is_doubled_so_the_output_is_unambiguous() -> None:
    assert escape("C:\\x1b") == "C:\\\\x1b"
    assert unescape(escape("C:\\x1b")) == "C:\\x1b"


@given(st.text())
def test_escape_output_is_always_printable_and_decodes_back_to_the_input(text: str) -> None:
    shown = escape(text)
    assert not any(dangerous(ch) for ch in shown)
    assert unescape(shown) == text


@given(st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_undecodable_bytes_arrive_as_lone_surrogates_and_are_escaped(text: str) -> None:
    assert escape(text).isprintable()


def test_secret_summary_shows_length_and_a_keyed_fingerprint_not_the_value() -> None:
    value = "hunter2-correct-horse"
    shown = secret_summary(value)
    assert shown.startswith(f"<secret: {len(value)} chars, fp ")
    assert value not in shown and value.encode().hex() not in shown
    # same process, same value: same fingerprint; another value: another one
    assert shown == secret_summary(value)
    assert shown != secret_summary(value + "!")


def test_the_fingerprint_is_keyed_so_a_plain_hash_of_a_guess_does_not_match_it() -> None:
    import hashlib

    pin = "4711"
    guess_digest = hashlib.sha256(pin.encode()).hexdigest()
    assert fingerprint(pin) not in guess_digest
    # another process (another key) gives another fingerprint for the same value
    assert fingerprint(pin, b"k" * 32) != fingerprint(pin, b"j" * 32)
    assert len(fingerprint(pin)) == 8


def _loaded_after(code: str) -> set[str]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = f"{code}\nimport json, sys\nsys.stdout.write(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def test_display_and_exposure_are_standard_library_only_and_load_no_ctypes_on_import() -> None:
    loaded = _loaded_after("import broker.wire.display, broker.exposure")
    third_party = {"pydantic", "zmq", "psutil", "cryptography", "mcp"}
    assert not {m.split(".")[0] for m in loaded} & third_party
    assert "ctypes" not in loaded  # the shim pays for it only when it scrubs


def test_an_approval_lists_every_stored_argument_and_no_secret_value() -> None:
    from pydantic import SecretStr

    from broker.server.approval_view import approval_lines, shown_args
    from broker.wire.protocol import EntryEditParams, SecretValue

    value = "Attacker-Known-Pass-8812"
    params = EntryEditParams(
        ref="e_1",
        url="https://github.com\x1b[2K\x1b[1A      tags: +reviewed -",
        add_tags=["reviewed"],
        secrets={"password": SecretValue(value=SecretStr(value))},
    )
    args = shown_args(params)
    assert args["url"] == params.url  # exact on the wire; escaped where rendered
    assert args["secrets"] == {"password": secret_summary(value)}
    lines = approval_lines("entry.edit", params)
    text = "\n".join(lines)
    assert value not in text and "\x1b" not in text
    assert lines[0] == "runs entry.edit with:"
    assert "  url: https://github.com\\x1b[2K\\x1b[1A      tags: +reviewed -" in lines
    assert "  add_tags: [reviewed]" in lines
    assert f"    password: <secret: {len(value)} chars, fp " in text
