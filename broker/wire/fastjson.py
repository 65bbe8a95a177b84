"""json.dumps without its per-call cost, for the hot path's fixed encoder settings.

`json.JSONEncoder(...).encode(obj)` builds a new C encoder object on every call (and
json.dumps with non-default arguments a whole JSONEncoder); `encoder(...)` builds the C encoder
once and reuses it. Same output as `json.JSONEncoder(same settings).encode`, except that a
circular structure raises RecursionError, not ValueError (there is no circular check; the hot
path's documents are trees). Falls back to JSONEncoder where the C encoder is missing.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any

_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # (not in the type stubs)


def encoder(
    *,
    sort_keys: bool = False,
    ensure_ascii: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> Callable[[Any], str]:
    """`json.JSONEncoder(sort_keys=…, ensure_ascii=…, separators=(",", ":"), default=…).encode`."""
    py = json.JSONEncoder(
        sort_keys=sort_keys, ensure_ascii=ensure_ascii, separators=(",", ":"), default=default
    )
    if _make_c_encoder is None:
        return py.encode
    strings = (
        json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    )
    c = _make_c_encoder(None, py.default, strings, None, ":", ",", sort_keys, False, True)

    def encode(obj: Any) -> str:
        if isinstance(obj, str):  # (JSONEncoder.encode's own shortcut)
            return str(strings(obj))
        return "".join(c(obj, 0))

    return encode
