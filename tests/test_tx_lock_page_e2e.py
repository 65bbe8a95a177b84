"""A vault lock overtaking the approval page's passkey write, against a real broker and Debian's
headless Chromium (a CDP virtual authenticator, as in test_approve_page_browser.py). The
registration is verified, then its save waits for the broker's write lock behind `vault.lock`
(the test holds the vault database's write lock, see test_tx_lock_e2e.py): the page answers
VAULT_LOCKED, never INTERNAL_ERROR, and no passkey is half-registered.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest

from .test_approve_page_browser import (
    browser,  # noqa: F401 - the module's headless Chromium
    cli,
    open_page,
    started_world,
    status_text,
    virtual_authenticator,
)
from .test_tx_lock_e2e import _attempts, _owner, _queue_lock, _until
from .test_tx_race_e2e import vault_write_held

pytestmark = pytest.mark.slow


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_passkey_whose_save_a_lock_overtakes_answers_vault_locked(
    browser: Any,  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By

    with started_world() as world:
        home = world.home
        addr = f"ipc://{home}/run/broker.sock"

        owner = functools.partial(_owner, addr)

        def attempts() -> int:
            return _attempts(home, "space.add")

        def verified() -> bool:
            log = home / "state" / "broker.log"
            return log.exists() and "passkey registration verified" in log.read_text()

        adding, url = cli(world, "passkey", "add", password=True)
        try:
            open_page(browser, url)
            virtual_authenticator(browser)
            with vault_write_held(home):
                blocker = asyncio.ensure_future(
                    asyncio.to_thread(owner, "space.add", {"name": "other"})
                )
                await _until(lambda: attempts() == 1, "the owner's write never started")
                sock, lock_id = await asyncio.to_thread(_queue_lock, addr)
                await asyncio.to_thread(
                    lambda: browser.find_element(By.ID, "passkey-register").click()
                )
                # verified, its save now waits for the write lock behind the lock
                await _until(verified, "the registration never reached its save")
            try:
                assert await blocker == "OK"
                status = await asyncio.to_thread(status_text, browser)
                assert await asyncio.to_thread(sock.poll, 60_000)
                assert json.loads(sock.recv())["id"] == lock_id
            finally:
                sock.close(linger=0)
        finally:
            adding.kill()  # it waits for a registration that was refused
            adding.wait()
            for stream in (adding.stdout, adding.stderr):
                if stream is not None:
                    stream.close()
        assert status.startswith("VAULT_LOCKED"), status
        world.apm.ok("unlock")
        assert world.wire("passkey.list", {}, token=None)["passkeys"] == []
        assert "other" in {
            s["name"] for s in json.loads(world.apm.ok("space", "ls", "--json").stdout)
        }
