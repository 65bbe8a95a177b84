"""#13.11: `apm run`'s masking also replaces a secret's hex, base64 (standard and url-safe,
padded or not, inside a longer base64 stream at any of its 3 alignments) and URL-encoded
forms, while streaming and across chunk boundaries. Property-tested with hypothesis; the last
test runs the attack through the real `apm run`."""

from __future__ import annotations

import base64
import itertools
import sys
from urllib.parse import quote, quote_plus

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.cli.masking import MARK, MIN_FORM, Masker, forms

from .conftest import PASSWORD, Apm, Broker, clean_env, register_secret

SECRETS = st.binary(min_size=8, max_size=48)
TEXT = st.binary(max_size=40)


def stream(masker: Masker, data: bytes, cuts: list[int]) -> bytes:
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    out = b"".join(masker.feed(data[a:b]) for a, b in itertools.pairwise(points))
    return out + masker.flush()


def encodings(secret: bytes) -> dict[str, bytes]:
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "b64": b64,
        "b64-nopad": b64.rstrip(b"="),
        "b64url": url,
        "b64url-nopad": url.rstrip(b"="),
        "url": quote(secret, safe="").encode(),
        "url-plus": quote_plus(secret, safe="").encode(),
    }


def determined_by(prefix_len: int, n: int, encoded: bytes) -> bytes:
    """The characters of a base64 stream whose 6 bits all come from bytes
    [prefix_len, prefix_len + n) of the decoded stream."""
    lo, hi = 8 * prefix_len, 8 * (prefix_len + n)
    return bytes(c for j, c in enumerate(encoded) if 6 * j >= lo and 6 * j + 6 <= hi)


@settings(max_examples=300)
@given(SECRETS, TEXT, TEXT, st.lists(st.integers(0, 200), max_size=8), st.data())
def test_no_encoded_form_of_a_secret_survives_any_chunking(
    secret: bytes, before: bytes, after: bytes, cuts: list[int], data: st.DataObject
) -> None:
    name, form = data.draw(st.sampled_from(sorted(encodings(secret).items())))
    assume(len(form) >= MIN_FORM or name == "raw")
    # a form could only be rebuilt across a mark if it held the mark's first or last byte
    assume(b"<" not in form and b">" not in form)
    out = stream(Masker([secret]), before + form + after, cuts)
    assert form not in out, name


@settings(max_examples=300)
@given(SECRETS, TEXT, TEXT, st.booleans(), st.lists(st.integers(0, 300), max_size=8))
def test_a_secret_inside_a_longer_base64_stream_is_masked_at_every_alignment(
    secret: bytes, before: bytes, after: bytes, urlsafe: bool, cuts: list[int]
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    encoded = encode(before + secret + after)
    core = determined_by(len(before), len(secret), encoded)
    assume(len(core) >= MIN_FORM)
    out = stream(Masker([secret]), encoded, cuts)
    assert core not in out, (len(before) % 3, core)


@given(SECRETS, st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=10))
def test_chunking_never_changes_the_output(secret: bytes, data: bytes, cuts: list[int]) -> None:
    whole = stream(Masker([secret]), data, [])
    assert stream(Masker([secret]), data, cuts) == whole
    assert stream(Masker([secret]), data, list(range(len(data)))) == whole


def test_text_around_an_encoded_secret_is_kept_and_short_forms_are_not_masked() -> None:
    secret = b"sk_live_Stripe-7719"
    line = b"Authorization: Basic " + base64.b64encode(b"user:" + secret) + b"\n"
    out = stream(Masker([secret]), line, [7, 30])
    assert out.startswith(b"Authorization: Basic dXNlcj") and MARK in out
    # a 3-byte value: its hex (6 chars) would hit unrelated output, only the raw value counts
    assert forms(b"abc") == {b"abc"}
    assert stream(Masker([b"abc"]), b"616263 YWJj abc", []) == b"616263 YWJj " + MARK


def test_apm_run_masks_the_encoded_forms_a_child_prints(vault: Broker, apm: Apm) -> None:
    """The attack, end to end: the child prints its secret as hex, base64 and URL-encoded."""
    key = "Api-Key+With/Odd=Chars-5521"
    register_secret(key)
    apm.ok("add", "api_key", "svc", "--from-stdin", stdin=key + "\n")
    child = (
        "import base64, os, sys, urllib.parse\n"
        "k = os.environ['K'].encode()\n"
        "for form in (k.hex(), base64.b64encode(k).decode(), base64.urlsafe_b64encode(k).decode(),"
        " base64.b64encode(b'user:' + k).decode(), urllib.parse.quote(k, safe='')):\n"
        "    sys.stdout.write('[' + form + ']\\n'); sys.stdout.flush()\n"
    )
    proc = apm(
        "run",
        "--env",
        "K=apm://default/svc/key",
        "--password-stdin",
        "--",
        sys.executable,
        "-c",
        child,
        stdin=PASSWORD + "\n",
        env=clean_env(apm.home),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all(MARK.decode() in ln for ln in lines), lines
    for form in encodings(key.encode()).values():
        if len(form) >= MIN_FORM:
            assert form.decode() not in proc.stdout


@given(SECRETS, st.binary(max_size=100))
def test_only_a_tail_that_could_still_become_a_form_is_held_back(
    secret: bytes, data: bytes
) -> None:
    m = Masker([secret])
    out = m.feed(data)
    held = m.buf
    if held:
        assert any(f.startswith(held) for f in forms(secret))
    for p in range(1, len(out) + 1):  # no longer tail of what was written could grow into one
        assert not any(f.startswith(out[-p:] + held) for f in forms(secret)), p
    assert out + m.flush() == stream(Masker([secret]), data, [])


def test_a_prompt_without_a_newline_is_shown_at_once() -> None:
    m = Masker([b"sk_live_Stripe-7719"])
    assert m.feed(b"Continue? [y/N] ") == b"Continue? [y/N] "
    assert m.feed(b"token: sk_li") == b"token: "  # could still become the secret
    assert m.feed(b"ve_Stripe-7719\n") == MARK + b"\n"
