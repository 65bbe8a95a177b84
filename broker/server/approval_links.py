"""The approval page's one-time links: an unguessable id per pending item (a transaction, an
access request, or a passkey registration), with the per-page CSRF token and the WebAuthn
challenge of the page it opens.

Rules:
- Ids and CSRF tokens are 256 random bits; a link names one item and is valid while that item
  is undecided and unexpired (the page checks the item itself on every use); a decision drops
  it. Links live in broker memory only: a restart makes new ones.
- A link is not a capability to approve: approving needs the person's proof (a user-verifying
  passkey assertion, or the master password when no passkey is registered). Denying needs
  none, like `apm request deny`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

LinkKind = Literal["tx", "request", "passkey"]


@dataclass
class Link:
    id: str
    kind: LinkKind
    item: str  # tx_id, request id, or "register" for a passkey registration
    csrf: str
    expires_at: datetime | None = None  # a registration link's own end (items have theirs)
    challenge: bytes | None = None  # the WebAuthn challenge last issued for this page
    used: bool = False


@dataclass
class ApprovalLinks:
    base: str | None = None  # "http://localhost:PORT" once the page is served
    _by_id: dict[str, Link] = field(default_factory=dict)
    _by_item: dict[tuple[str, str], str] = field(default_factory=dict)

    def link(self, kind: LinkKind, item: str, expires_at: datetime | None = None) -> Link:
        """The item's link (made on first use, so every path that names it shows the same)."""
        known = self._by_item.get((kind, item))
        if known is not None and known in self._by_id:
            return self._by_id[known]
        made = Link(
            id=secrets.token_urlsafe(32),
            kind=kind,
            item=item,
            csrf=secrets.token_urlsafe(32),
            expires_at=expires_at,
        )
        self._by_id[made.id] = made
        self._by_item[(kind, item)] = made.id
        if len(self._by_id) > 4096:  # bounded: the oldest links go first
            oldest = next(iter(self._by_id))
            self.drop(self._by_id[oldest].kind, self._by_id[oldest].item)
        return made

    def url(self, kind: LinkKind, item: str) -> str | None:
        """The page's address for the item, or None while no page is served."""
        if self.base is None:
            return None
        return f"{self.base}/approve/{self.link(kind, item).id}"

    def get(self, link_id: str) -> Link | None:
        return self._by_id.get(link_id)

    def drop(self, kind: LinkKind, item: str) -> None:
        link_id = self._by_item.pop((kind, item), None)
        if link_id is not None:
            self._by_id.pop(link_id, None)
