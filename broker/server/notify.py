"""Notifications about access requests and writes awaiting the owner: a desktop notification,
a Slack-compatible webhook, a Microsoft Teams webhook and email over SMTP.

Rules:
- Never block or fail the request that triggered them: delivery runs in the background,
  failures are retried with backoff and then logged.
- A payload never holds a secret: request id, entry name, session label, justification,
  duration, the approve command and the approval page's (loopback) link.
- The SMTP password is an entry in the vault, read by the broker at send time (`password`
  callback); it is never in the config file, a log line or a message.
- Nothing an agent or client chose reaches a notification daemon, a terminal or a webhook
  consumer as a control character: `send` escapes the title, each line of the body and every
  string in the payload (broker.wire.display), whoever built them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import smtplib
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from broker.wire.display import escape

log = logging.getLogger("apm.broker.notify")

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class EmailConfig:
    """[notify.email]: where to send, and the vault entry holding the SMTP password."""

    host: str
    sender: str
    to: tuple[str, ...]
    port: int = 587
    starttls: bool = True
    user: str | None = None
    password_entry: str | None = None  # "space/name" or "name": its main secret field

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> EmailConfig:
        unknown = set(doc) - {"host", "port", "starttls", "user", "from", "to", "password_entry"}
        if unknown:
            raise ValueError(f"unknown [notify.email] key(s): {', '.join(sorted(unknown))}")
        to = doc.get("to")
        recipients = (to,) if isinstance(to, str) else tuple(to or ())
        host, sender, port = doc.get("host"), doc.get("from"), doc.get("port", 587)
        if not isinstance(host, str) or not isinstance(sender, str) or not recipients:
            raise ValueError("[notify.email] needs host, from and to")
        if not all(isinstance(r, str) and "@" in r for r in recipients) or "@" not in sender:
            raise ValueError("[notify.email] from and to must be email addresses")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("notify.email.port must be a port number")
        user, entry = doc.get("user"), doc.get("password_entry")
        if (user is None) != (entry is None):
            raise ValueError("[notify.email] user and password_entry go together")
        return cls(
            host=host,
            sender=sender,
            to=recipients,
            port=port,
            starttls=bool(doc.get("starttls", True)),
            user=str(user) if user is not None else None,
            password_entry=str(entry) if entry is not None else None,
        )


@dataclass
class Notifier:
    webhook_url: str | None = None
    desktop: bool = True
    retry_delays: tuple[float, ...] = RETRY_DELAYS
    teams_url: str | None = None
    email: EmailConfig | None = None
    # the SMTP password, read from the vault when a message goes out (None: locked, missing)
    password: Callable[[str], str | None] | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, title: str, body: str, payload: dict[str, Any]) -> None:
        """Fire and forget."""
        from .plugin_host import HOST  # enabled notifier plugins (none unless the owner said)

        title = escape(title)
        body = "\n".join(escape(line) for line in body.split("\n"))
        payload = _escaped(payload)
        for coro in (
            self._desktop(title, body),
            self._webhook(title, body, payload),
            self._teams(title, body, payload),
            self._email(title, body),
            HOST.deliver(title, body, payload),
        ):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def _desktop(self, title: str, body: str) -> None:
        if not self.desktop:
            return
        if sys.platform == "darwin":
            tool = shutil.which("osascript")
            script = f"display notification {json.dumps(body)} with title {json.dumps(title)}"
            argv = [tool, "-e", script] if tool else None
        else:
            tool = shutil.which("notify-send")
            argv = [tool, "--app-name=apm", title, body] if tool else None
        if argv is None:
            log.info("desktop notification skipped: no notify-send/osascript on this system")
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            await asyncio.wait_for(proc.wait(), timeout=5)
        except (OSError, TimeoutError) as exc:
            log.warning("desktop notification failed: %s", exc)

    async def _webhook(self, title: str, body: str, payload: dict[str, Any]) -> None:
        if not self.webhook_url:
            return
        # Slack-style markup: `<!channel>` pings everyone, `<url|text>` disguises a link; Slack
        # asks senders to escape &, < and > in text, and the title/body hold agents' words
        doc = {"text": f"*{_markup_escaped(title)}*\n{_markup_escaped(body)}", "apm": payload}
        await self._deliver(self.webhook_url, json.dumps(doc).encode(), "webhook")

    async def _teams(self, title: str, body: str, payload: dict[str, Any]) -> None:
        """Microsoft Teams (an incoming webhook or a Workflows "post to a channel" trigger):
        a message with one Adaptive Card; the page link is a button."""
        if not self.teams_url:
            return
        card: dict[str, Any] = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            # RichTextBlock/TextRun, not TextBlock: a TextRun's text is never read as Markdown,
            # so an agent's words cannot become a disguised link ("[Approve](https://…)")
            "body": [
                {
                    "type": "RichTextBlock",
                    "inlines": [{"type": "TextRun", "text": title, "weight": "Bolder"}],
                },
                *(
                    {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": line}]}
                    for line in body.split("\n")
                    if line
                ),
            ],
        }
        url = payload.get("page_url")
        if isinstance(url, str) and url.startswith("http"):
            card["actions"] = [
                {"type": "Action.OpenUrl", "title": "Open the approval page", "url": url}
            ]
        doc = {
            "type": "message",
            "attachments": [
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
            ],
        }
        await self._deliver(self.teams_url, json.dumps(doc).encode(), "teams webhook")

    async def _email(self, title: str, body: str) -> None:
        cfg = self.email
        if cfg is None:
            return
        password = None
        if cfg.password_entry is not None:
            password = self.password(cfg.password_entry) if self.password else None
            if password is None:
                log.warning("email notification skipped: the SMTP password entry is unavailable")
                return
        msg = EmailMessage()
        msg["Subject"] = title.replace("\n", " ")[:200]
        msg["From"] = cfg.sender
        msg["To"] = ", ".join(cfg.to)
        msg.set_content(body + "\n")
        for attempt, delay in enumerate((0.0, *self.retry_delays), start=1):
            if delay:
                await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(self._smtp, cfg, password, msg)
                return
            except (OSError, smtplib.SMTPException) as exc:
                log.warning("email delivery failed (attempt %d): %s", attempt, type(exc).__name__)
        log.error("email delivery gave up after %d attempts", len(self.retry_delays) + 1)

    @staticmethod
    def _smtp(cfg: EmailConfig, password: str | None, msg: EmailMessage) -> None:
        with smtplib.SMTP(cfg.host, cfg.port, timeout=10) as smtp:
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if cfg.user is not None and password is not None:
                smtp.login(cfg.user, password)
            smtp.send_message(msg)

    async def _deliver(self, url: str, data: bytes, what: str) -> None:
        for attempt, delay in enumerate((0.0, *self.retry_delays), start=1):
            if delay:
                await asyncio.sleep(delay)
            try:
                status = await asyncio.to_thread(self._post, url, data)
                if 200 <= status < 300:
                    return
                log.warning("%s answered %s (attempt %d)", what, status, attempt)
            except (OSError, urllib.error.URLError) as exc:
                log.warning("%s delivery failed (attempt %d): %s", what, attempt, exc)
        log.error("%s delivery gave up after %d attempts", what, len(self.retry_delays) + 1)

    @staticmethod
    def _post(url: str, data: bytes) -> int:
        if not url.startswith(("https://", "http://")):
            raise urllib.error.URLError("webhook_url must be http(s)")
        req = urllib.request.Request(  # noqa: S310 - scheme checked above
            url, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(str(k)): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def _markup_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
