"""Replacing secret values in a byte stream, while streaming and across chunk boundaries.

`feed` returns what can safely be written now; it holds back only the bytes that could still
be the start of a secret split across chunks (at most the longest secret's length minus one).
"""

from __future__ import annotations

MARK = b"<concealed by apm>"


class Masker:
    def __init__(self, secrets: list[bytes]) -> None:
        # longest first: at the same position the longest secret wins
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.keep = max((len(s) for s in self.secrets), default=1) - 1
        self.buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk
        return self._drain(final=False)

    def flush(self) -> bytes:
        return self._drain(final=True)

    def _drain(self, final: bool) -> bytes:
        buf, out, i = self.buf, [], 0
        cut = len(buf) if final else max(0, len(buf) - self.keep)
        while True:
            best: tuple[int, bytes] | None = None
            for s in self.secrets:
                p = buf.find(s, i)
                if p != -1 and (best is None or p < best[0]):
                    best = (p, s)
            if best is None or best[0] >= cut:
                out.append(buf[i:cut])
                self.buf = buf[cut:]
                return b"".join(out)
            p, s = best
            out.append(buf[i:p])
            out.append(MARK)
            i = p + len(s)
            cut = max(cut, i)
