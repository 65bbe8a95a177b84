"""Login entries as credentials for other programs: matching by URL, reading, storing, erasing.

Shared by the git credential helper and `docker-credential-apm`. Everything goes through the
broker, so a session's scopes, entry filters and grants apply as they do for `apm get`.

Rules:
- Only `login` entries with a URL are candidates; a match needs the same host (and port),
  the same protocol when both name one, and the entry's path as a prefix of the asked path.
- Erase removes only an entry this helper stored (its tag) and only while it still holds the
  rejected password: a server's 401 never deletes a login the person made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from broker.wire.entries import EntryMeta
from broker.wire.errors import AlreadyExists
from broker.wire.protocol import (
    EntryAddParams,
    EntryEditParams,
    EntryGetParams,
    EntryListParams,
    EntryRef,
    EntryRemoveParams,
    SecretValue,
)

from .client import BrokerClient

PAGE = 1000


@dataclass(frozen=True)
class Target:
    protocol: str | None
    host: str  # host[:port], lower case
    path: str  # without leading/trailing slashes

    @classmethod
    def from_url(cls, url: str) -> Target | None:
        if "://" not in url:
            url = "https://" + url
        parts = urlsplit(url)
        if not parts.netloc:
            return None
        host = parts.netloc.rsplit("@", 1)[-1].lower()
        return cls(parts.scheme.lower() or None, host, parts.path.strip("/"))

    def url(self) -> str:
        return f"{self.protocol or 'https'}://{self.host}" + (f"/{self.path}" if self.path else "")


def match_score(entry_url: str, want: Target) -> int | None:
    """None if the entry's URL does not cover `want`; else how specific it is (path length)."""
    have = Target.from_url(entry_url)
    if have is None or have.host != want.host:
        return None
    if have.protocol and want.protocol and have.protocol != want.protocol:
        return None
    if have.path and not (want.path == have.path or want.path.startswith(have.path + "/")):
        return None
    return len(have.path)


def username_of(entry: EntryMeta) -> str | None:
    f = entry.fields.get("username")
    return f.value if f is not None else None


class LoginStore:
    def __init__(self, client: BrokerClient, creds: dict[str, Any], space: str | None) -> None:
        self.client = client
        self.creds = creds
        self.space = space

    def logins(self, tag: str | None = None) -> list[EntryMeta]:
        out: list[EntryMeta] = []
        while True:
            res = self.client.call(
                "entry.list",
                EntryListParams(
                    space=self.space, type="login", tag=tag, offset=len(out), limit=PAGE
                ),
                **self.creds,
            )
            out.extend(res.entries)
            if not res.entries or len(out) >= res.total:
                return out

    def find(self, want: Target, username: str | None = None) -> list[EntryMeta]:
        """Matching logins, most specific first (longest path, then newest)."""
        scored = []
        for e in self.logins():
            if not e.url:
                continue
            score = match_score(e.url, want)
            if score is None:
                continue
            if username and username_of(e) not in (None, username):
                continue
            scored.append((score, e.updated_at, e))
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [e for _, _, e in scored]

    def password(self, entry: EntryMeta) -> SecretStr:
        res = self.client.call(
            "entry.get", EntryGetParams(ref=entry.id, field="password"), **self.creds
        )
        value: SecretStr = res.value
        return value

    def store(self, want: Target, username: str, password: SecretStr, tag: str, prefix: str) -> str:
        """Add or update the login for (target, username); returns what was done."""
        for e in self.find(want, username):
            if username_of(e) == username and match_score(e.url or "", want) == len(want.path):
                if self.password(e).get_secret_value() == password.get_secret_value():
                    return "unchanged"
                self.client.call(
                    "entry.edit",
                    EntryEditParams(
                        ref=e.id,
                        expect_updated_at=e.updated_at,
                        secrets={"password": SecretValue(value=password)},
                    ),
                    **self.creds,
                )
                return "updated"
        base = f"{prefix}{want.host}" + (f"/{want.path}" if want.path else "")
        for name in (base, f"{base} ({username})"[:200]):
            try:
                self.client.call(
                    "entry.add",
                    EntryAddParams(
                        type="login",
                        name=name[:200],
                        space=self.space or "default",
                        url=want.url(),
                        tags=[tag],
                        fields={"username": username},
                        secrets={"password": SecretValue(value=password)},
                    ),
                    **self.creds,
                )
                return "added"
            except AlreadyExists:
                continue
        raise AlreadyExists("a login with that name already exists", hint="rename it")

    def erase(
        self, want: Target, username: str | None, password: SecretStr | None, tag: str
    ) -> int:
        removed = 0
        for e in self.find(want, username):
            if tag not in e.tags or match_score(e.url or "", want) != len(want.path):
                continue
            if password is not None and (
                self.password(e).get_secret_value() != password.get_secret_value()
            ):
                continue
            self.client.call(
                "entry.remove",
                EntryRemoveParams(ref=e.id, expect_updated_at=e.updated_at),
                **self.creds,
            )
            removed += 1
        return removed

    def show(self, ref: str) -> EntryMeta:
        res = self.client.call("entry.show", EntryRef(ref=ref), **self.creds)
        entry: EntryMeta = res.entry
        return entry


def space_from_env() -> str | None:
    return os.environ.get("APM_CREDENTIAL_SPACE") or None
