"""URL-mode elicitation: the approval page's link goes to the AI client, which shows it to the
person where they are ("open this page to decide"), when the client declared URL elicitation.

Rules:
- It only points at the page; the client's answer (opened, declined, cancelled) decides
  nothing. The decision is made on the page with the person's proof.
- A client without URL-mode elicitation (an empty `elicitation` capability means form only)
  is not asked; the tool result still names the CLI command and the page.
- Failures never fail the tool call that offered the link.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

log = logging.getLogger("apm.broker.page")

ANSWER_SECONDS = 300.0  # how long the client may keep its prompt open before the call goes on


def url_capable(mctx: Any) -> bool:
    caps = getattr(mctx.session, "client_capabilities", None) if mctx is not None else None
    elicitation = getattr(caps, "elicitation", None)
    return elicitation is not None and getattr(elicitation, "url", None) is not None


async def offer_page(mctx: Any, url: str | None, message: str) -> str | None:
    """Ask the client to show `url`; returns its answer's action, or None if not asked."""
    if url is None or not url_capable(mctx):
        return None
    try:
        answer = await asyncio.wait_for(
            mctx.session.elicit_url(
                message, url, "apm-" + secrets.token_hex(8), related_request_id=mctx.request_id
            ),
            ANSWER_SECONDS,
        )
    except Exception as exc:  # never fails the call that offered it
        log.info("URL elicitation not delivered: %s", type(exc).__name__)
        return None
    return str(answer.action)
