"""Browser password CSVs: Chrome/Edge/Brave (name,url,username,password[,note]) and Firefox
(url,username,password,httpRealm,formActionOrigin,guid,...)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from urllib.parse import urlsplit

from broker.wire.errors import InvalidParameters

from . import ImportContext, Loaded, Record, read_text


def host_of(url: str) -> str:
    parts = urlsplit(url if "://" in url else "https://" + url)
    return parts.hostname or url


def rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    out = []
    try:
        if reader.fieldnames is None:
            raise InvalidParameters("the CSV file is empty")
        for row in reader:
            out.append(
                {(k or "").strip().lower(): v if isinstance(v, str) else "" for k, v in row.items()}
            )
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise InvalidParameters(f"the CSV file is malformed near line {reader.line_num}") from exc
    return out


def load(path: Path, ctx: ImportContext) -> Loaded:
    data = rows(read_text(path))
    out = Loaded()
    cols = set(data[0]) if data else set()
    if data and (not {"url", "username", "password"} <= cols or {"title", "otpauth"} & cols):
        raise InvalidParameters(
            "not a browser password CSV (expected url, username and password columns)",
            hint="for 1Password CSV use the format 1password-csv",
        )
    for i, row in enumerate(data, start=2):
        url = row.get("url", "").strip()
        name = row.get("name", "").strip() or host_of(url) or f"line {i}"
        if not row.get("password"):
            out.failed.append((name, f"line {i}: no password"))
            continue
        out.records.append(
            Record(
                name=name,
                username=row.get("username") or None,
                password=row["password"],
                url=url or None,
                notes=row.get("note") or row.get("notes") or None,
            )
        )
    return out
