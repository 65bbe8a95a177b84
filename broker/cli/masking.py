"""Replacing secret values in a byte stream, while streaming and across chunk boundaries: the
value itself and the encodings a program is likely to print it in.

`feed` returns what can safely be written now; it holds back only a tail of the output that
is the start of one of the forms below, which may still be completed by the next chunk (so a
prompt without a newline still shows at once, unless it ends like a secret begins).

Forms masked for each secret (#13.11):
- the raw bytes;
- hex, lower and upper case;
- base64, standard and url-safe alphabets, with and without `=` padding, as a whole value
  (`echo -n $KEY | base64`, a JWT segment);
- base64 of the value *inside a longer stream* (an Authorization header, a JSON blob): base64
  works on 3-byte groups, so a value starting at byte offset k of the stream is encoded
  differently for k mod 3 = 0, 1 and 2. For each alignment we mask the run of characters
  that depend on the value's bits only (the first and last characters also carry bits of
  the neighbouring bytes, so they are not knowable in advance and stay visible);
- URL (percent) encoding: `quote` with and without `/` kept, `quote_plus`, upper and lower
  case hex digits.

Rules:
- Derived forms shorter than MIN_FORM characters are not masked (they would hit unrelated
  output by chance; such a value is too short to be a credential). The raw value always is.
- Leftmost occurrence first; at the same position the longest form wins.
- Not covered (say so, don't pretend): base64 wrapped across lines (MIME, PEM), other
  encodings (base32, gzip, UTF-16), and any transformation the child computes.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import quote, quote_plus

MARK = b"<concealed by apm>"
MIN_FORM = 8

_PERCENT = re.compile(rb"%[0-9A-F]{2}")


def _b64_core(secret: bytes, shift: int, alphabet: bytes | None) -> bytes:
    """The base64 characters that depend only on `secret` when it starts at byte offset
    `shift` (0..2) of a 3-byte group: char j covers bits [6j, 6j+6) of the stream and is known
    iff that window lies inside the secret's bits [8*shift, 8*(shift+n))."""
    n = len(secret)
    encoded = base64.b64encode(b"\0" * shift + secret + b"\0\0", altchars=alphabet)
    first = -(-8 * shift // 6)  # ceil
    last = 8 * (shift + n) // 6  # exclusive
    return encoded[first:last]


def forms(secret: bytes) -> set[bytes]:
    """Every form of `secret` the masker replaces (see the module docstring)."""
    if not secret:
        return set()
    derived: set[bytes] = {secret.hex().encode(), secret.hex().upper().encode()}
    for alphabet in (None, b"-_"):
        whole = base64.b64encode(secret, altchars=alphabet)
        derived |= {whole, whole.rstrip(b"=")}
        derived |= {_b64_core(secret, shift, alphabet) for shift in range(3)}
    for text in (quote(secret, safe=""), quote(secret, safe="/"), quote_plus(secret, safe="")):
        upper = text.encode()
        derived |= {upper, _PERCENT.sub(lambda m: m.group(0).lower(), upper)}
    return {secret} | {f for f in derived if len(f) >= MIN_FORM}


class Masker:
    def __init__(self, secrets: list[bytes], encodings: bool = True) -> None:
        every: set[bytes] = set()
        for s in secrets:
            if s:
                every |= forms(s) if encodings else {s}
        # longest first: at the same position the longest form wins (re tries them in order)
        self.forms = sorted(every, key=lambda f: (-len(f), f))
        self.pattern = re.compile(b"|".join(re.escape(f) for f in self.forms)) if every else None
        self.keep = max((len(f) for f in self.forms), default=1) - 1
        self.starts = frozenset(f[0] for f in self.forms)
        self.buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk
        return self._drain(final=False)

    def flush(self) -> bytes:
        return self._drain(final=True)

    def _held(self, buf: bytes) -> int:
        """Where the tail that could still become a form begins (len(buf): nothing to hold)."""
        for p in range(max(0, len(buf) - self.keep), len(buf)):
            if buf[p] in self.starts:
                tail = buf[p:]
                if any(f.startswith(tail) for f in self.forms):
                    return p
        return len(buf)

    def _drain(self, final: bool) -> bytes:
        buf, out, i = self.buf, [], 0
        # a form starting before `cut` is complete in buf: what is left after cut is shorter
        # than every form that starts there
        cut = len(buf) if final else self._held(buf)
        while True:
            m = self.pattern.search(buf, i) if self.pattern is not None else None
            if m is None or m.start() >= cut:
                out.append(buf[i:cut])
                self.buf = buf[cut:]
                return b"".join(out)
            out.append(buf[i : m.start()])
            out.append(MARK)
            i = m.end()
            cut = max(cut, i)
