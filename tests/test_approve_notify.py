"""Notifications (#17.4) from a real broker: email to a local SMTP server (aiosmtpd) logging in
with the password kept as a vault entry, the Microsoft Teams webhook format, and the
Slack-compatible webhook, for an access request and for a write awaiting the owner. Each
carries the page link and the CLI command, and never a secret.
"""

from __future__ import annotations

import email
import json
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr

from broker.wire.errors import ApmError

from .conftest import Apm, Broker, make_home, register_secret
from .hook_server import Hook
from .mcp_client import ok_of, shim_client
from .test_approve_page_browser import World

pytestmark = pytest.mark.slow

SMTP_PASSWORD = "smtp-Pass-4410-unique"
VALUE = "sk-Notify-9021-unique"
NEW_VALUE = "pw-Held-3377-unique"
WHY = "rotate the notify test credentials"
for _s in (SMTP_PASSWORD, VALUE, NEW_VALUE):
    register_secret(_s)


@dataclass
class Mailbox:
    messages: list[Message] = field(default_factory=list)
    passwords: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            self.passwords.append(data.password)
            return AuthResult(
                success=data.login == b"apm" and data.password == SMTP_PASSWORD.encode()
            )
        return AuthResult(success=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Notified:
    world: World
    mailbox: Mailbox
    teams: Hook
    slack: Hook


@pytest.fixture(scope="module")
def notified() -> Iterator[Notified]:
    home = make_home()
    mailbox = Mailbox()
    port = free_port()
    smtp = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=mailbox.authenticate,
        auth_require_tls=False,
    )
    smtp.start()
    teams, slack = Hook(), Hook()
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_text(
        "[notify]\n"
        "desktop = false\n"
        f'webhook_url = "{slack.url}"\n'
        f'teams_webhook_url = "{teams.url}"\n'
        "[notify.email]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "starttls = false\n"
        'user = "apm"\n'
        'from = "apm@example.test"\n'
        'to = ["owner@example.test"]\n'
        'password_entry = "default/smtp"\n'
    )
    broker = Broker(home)
    apm = Apm(home)
    try:
        broker.start()
        apm.ok("init", "--profile", "interactive")
        world = World(home, apm, broker)
        world.wire(
            "entry.add",
            {"type": "login", "name": "smtp", "secrets": {"password": {"value": SMTP_PASSWORD}}},
        )
        world.wire(
            "entry.add",
            {"type": "api_key", "name": "notify-key", "secrets": {"key": {"value": VALUE}}},
        )
        yield Notified(world, mailbox, teams, slack)
    finally:
        broker.stop()
        smtp.stop()
        teams.close()
        slack.close()
        shutil.rmtree(home, ignore_errors=True)


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the notification did not arrive"
        time.sleep(0.05)


def text_of(msg: Message) -> str:
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    return f"{msg['Subject']}\n{body.decode()}"


def no_secret(text: str) -> None:
    for secret in (SMTP_PASSWORD, VALUE, NEW_VALUE):
        assert secret not in text


def test_an_access_request_is_emailed_and_posted_with_the_link_and_the_command(
    notified: Notified,
) -> None:
    world = notified.world
    token = world.session(approve="agent", scope="read")

    async def ask() -> str:
        async with shim_client(world.home, token, "legacy", 20) as client:
            args = {"entry": "notify-key", "duration_minutes": 5, "justification": WHY}
            return str(ok_of(await client.call_tool("request_access", args))["request_id"])

    rid = anyio.run(ask)
    listed = world.wire("request.list", {"pending": True})["requests"]
    url = next(r["page_url"] for r in listed if r["id"] == rid)
    assert url

    def mail_for() -> list[Message]:
        return [m for m in notified.mailbox.messages if rid in text_of(m)]

    wait_for(lambda: bool(mail_for()))
    text = text_of(mail_for()[0])
    assert url in text and f"apm request approve {rid}" in text
    assert "opens on this machine" in text and WHY in text
    no_secret(text)
    # the SMTP login used the vault entry's value
    assert SMTP_PASSWORD.encode() in notified.mailbox.passwords

    def card() -> dict[str, Any] | None:
        for doc in notified.teams.docs():
            content = doc["attachments"][0]["content"]
            if rid in json.dumps(content):
                return dict(content)
        return None

    wait_for(lambda: card() is not None)
    found = card()
    assert found is not None
    assert notified.teams.docs()[0]["type"] == "message"
    assert found["type"] == "AdaptiveCard"
    # agents' words travel as TextRuns (never Markdown): no disguised links in Teams
    assert {block["type"] for block in found["body"]} == {"RichTextBlock"}
    runs = [i for block in found["body"] for i in block["inlines"]]
    assert {i["type"] for i in runs} == {"TextRun"}
    assert any(WHY in i["text"] for i in runs)
    assert found["actions"] == [
        {"type": "Action.OpenUrl", "title": "Open the approval page", "url": url}
    ]
    no_secret(json.dumps(notified.teams.docs()))
    wait_for(lambda: any(rid in json.dumps(b) for b in notified.slack.docs()))
    slack = next(b for b in notified.slack.docs() if rid in json.dumps(b))
    assert url in slack["text"] and slack["apm"]["page_url"] == url
    no_secret(json.dumps(notified.slack.docs()))


def test_a_write_awaiting_the_owner_is_emailed_with_the_link_and_the_command(
    notified: Notified,
) -> None:
    world = notified.world
    token = world.session(approve="owner", scope="write")
    with pytest.raises(ApmError) as held:
        world.wire(
            "entry.add",
            {"type": "login", "name": "held", "secrets": {"password": {"value": NEW_VALUE}}},
            token=SecretStr(token),
        )
    tx_id = held.value.data["tx_id"]
    url = world.wire("approval.link", {"kind": "tx", "id": tx_id}, token=None)["url"]

    def mail_for() -> list[Message]:
        return [m for m in notified.mailbox.messages if tx_id in text_of(m)]

    wait_for(lambda: bool(mail_for()))
    text = text_of(mail_for()[0])
    assert url in text and f"apm tx approve {tx_id}" in text
    no_secret(text)
    wait_for(lambda: any(tx_id in json.dumps(b) for b in notified.teams.docs()))
    no_secret(json.dumps(notified.teams.docs()) + json.dumps(notified.slack.docs()))
    log = (world.home / "state" / "broker.log").read_text()
    no_secret(log)


def test_email_without_the_password_entry_is_refused_at_config_time(tmp_path: Path) -> None:
    from broker.server.daemon import load_config

    cfg = tmp_path / "config.toml"
    cfg.write_text('[notify.email]\nhost = "h"\nfrom = "a@b.c"\nto = "d@e.f"\nuser = "u"\n')
    with pytest.raises(ApmError) as refused:
        load_config(cfg)
    assert refused.value.code == "INVALID_PARAMETERS"
