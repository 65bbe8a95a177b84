"""`.env` files: each KEY=VALUE with a value becomes an `api_key` entry named KEY."""

from __future__ import annotations

from pathlib import Path

from ..env_scan import classify, parse_lines
from . import ImportContext, Loaded, Record, read_text


def load(path: Path, ctx: ImportContext) -> Loaded:
    out = Loaded()
    for ln in parse_lines(read_text(path)):
        if not ln.value or ln.value.startswith("apm://"):
            continue
        kind = classify(ln.key, ln.value) or "plain"
        out.records.append(
            Record(name=ln.key, kind="api_key", password=ln.value, tags=[f"env-{kind}"])
        )
    return out
