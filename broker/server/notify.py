"""Notifications about access requests: a desktop notification and an optional webhook.

Rules:
- Never block or fail the request that triggered them: delivery runs in the background,
  failures are retried with backoff and then logged.
- A payload never holds a secret: request id, entry name, session label, justification,
  duration and the approve command.
- Nothing an agent or client chose reaches a notification daemon, a terminal or a webhook
  consumer as a control character: `send` escapes the title, each line of the body and every
  string in the payload (broker.wire.display), whoever built them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import urllib.error
import urllib.request
from typing import Any

from broker.wire.display import escape

log = logging.getLogger("apm.broker.notify")

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


class Notifier:
    def __init__(
        self,
        webhook_url: str | None = None,
        desktop: bool = True,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        self.webhook_url = webhook_url
        self.desktop = desktop
        self.retry_delays = retry_delays
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, title: str, body: str, payload: dict[str, Any]) -> None:
        """Fire and forget."""
        from .plugin_host import HOST  # enabled notifier plugins (none unless the owner said)

        title = escape(title)
        body = "\n".join(escape(line) for line in body.split("\n"))
        payload = _escaped(payload)
        for coro in (
            self._desktop(title, body),
            self._webhook(title, body, payload),
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
        data = json.dumps(doc).encode()
        for attempt, delay in enumerate((0.0, *self.retry_delays), start=1):
            if delay:
                await asyncio.sleep(delay)
            try:
                status = await asyncio.to_thread(self._post, data)
                if 200 <= status < 300:
                    return
                log.warning("webhook answered %s (attempt %d)", status, attempt)
            except (OSError, urllib.error.URLError) as exc:
                log.warning("webhook delivery failed (attempt %d): %s", attempt, exc)
        log.error("webhook delivery gave up after %d attempts", len(self.retry_delays) + 1)

    def _post(self, data: bytes) -> int:
        url = self.webhook_url or ""
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
