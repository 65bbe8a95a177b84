"""The approval page in a real browser (#17.1, #17.2): Debian's headless chromium driven by
selenium through chromedriver, against a real broker process serving the page on its own
loopback port.

One browser for the module. It registers a passkey with a CDP virtual authenticator (user
verification on), approves a held write on the page with it (the write lands), denies a
request, meets an expired link, and renders hostile stored values inert. Forged POSTs (no CSRF
token, another Origin) are sent without the browser: that is what an attacker's page or
process would do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.cli.client import BrokerClient
from broker.wire.errors import ApmError

from .conftest import PASSWORD, Apm, Broker, clean_env, make_home, register_secret

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
VALUE = "pw-Page-5531-unique"
HOSTILE_VALUE = "<script>document.title='pwned'</script>\x1b[2J\x1b]0;evil\x07-Hostile-8812"
register_secret(VALUE)
register_secret(HOSTILE_VALUE)
WHY = "deploy the page test service today"


def ensure_chromium() -> None:
    """Debian's chromium and its driver, installed when missing (never a browser download)."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.fail(
            "chromium + chromium-driver are needed: apt-get install chromium chromium-driver"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "install", "-y", "chromium", "chromium-driver"], check=True, env=env)


@dataclass
class World:
    home: Path
    apm: Apm
    broker: Broker

    def wire(self, method: str, params: dict[str, Any] | None = None, **auth: Any) -> Any:
        with BrokerClient(f"ipc://{self.home}/run/broker.sock") as c:
            if not auth:
                auth = {"password": SecretStr(PASSWORD)}
            return c.call_raw(method, params or {}, timeout=30, **auth)

    def session(self, approve: str = "owner", scope: str = "write") -> str:
        res = self.wire(
            "session.create",
            {
                "scope": scope,
                "ttl_seconds": 3600,
                "label": "page-agent",
                "bind_host": False,
                "approve": approve,
            },
        )
        register_secret(res["token"])
        return str(res["token"])

    def held_add(self, token: str, name: str, value: str) -> tuple[str, str]:
        """A session's `entry.add` under owner policy: held; returns (tx_id, page url)."""
        secrets = {"password": {"value": value}}
        with pytest.raises(ApmError) as held:
            self.wire(
                "entry.add",
                {"type": "login", "name": name, "secrets": secrets},
                token=SecretStr(token),
            )
        assert held.value.code == "APPROVAL_PENDING"
        tx_id = held.value.data["tx_id"]
        link = self.wire("approval.link", {"kind": "tx", "id": tx_id}, token=None)
        assert link["url"], link
        return tx_id, link["url"]

    def names(self) -> set[str]:
        return {e["name"] for e in self.wire("entry.list", {})["entries"]}


@contextlib.contextmanager
def started_world(config: str | None = None) -> Iterator[World]:
    """A started, initialised broker of a new home (`config` as its config.toml), removed after."""
    home = make_home()
    if config is not None:
        (home / "config").mkdir(parents=True, exist_ok=True)
        (home / "config" / "config.toml").write_text(config)
    broker = Broker(home)
    apm = Apm(home)
    try:
        broker.start()
        apm.ok("init", "--profile", "interactive")
        yield World(home, apm, broker)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with started_world() as w:
        yield w


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ensure_chromium()
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = make_home() / "chromium-profile"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_script_timeout(20)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile.parent, ignore_errors=True)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    # the virtual authenticator answers only once WebAuthn is enabled on this page
    driver.execute_cdp_cmd("WebAuthn.enable", {"enableUI": False})


AUTHENTICATORS: list[str] = []


def virtual_authenticator(driver: Any) -> str:
    """A fresh CDP virtual authenticator with user verification, replacing any earlier one (so
    a new one holds none of the registered credentials)."""
    while AUTHENTICATORS:
        with contextlib.suppress(Exception):
            driver.execute_cdp_cmd(
                "WebAuthn.removeVirtualAuthenticator", {"authenticatorId": AUTHENTICATORS.pop()}
            )
    res = driver.execute_cdp_cmd(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    AUTHENTICATORS.append(str(res["authenticatorId"]))
    return AUTHENTICATORS[-1]


def status_text(driver: Any, timeout: float = 20.0) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            text = driver.find_element(By.ID, "status").text
            if text and "waiting" not in text:
                return str(text)
        time.sleep(0.1)
    return str(text)


def post(url: str, fields: dict[str, str], origin: str | None) -> tuple[int, str]:
    data = urllib.parse.urlencode(fields).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin is not None:
        headers["Origin"] = origin
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def csrf_of(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310
        page = resp.read().decode()
    found = re.search(r'name=csrf id=csrf value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# ---------------------------------------------------------------------- without a passkey


def test_a_forged_post_without_the_token_or_from_another_origin_is_refused(world: World) -> None:
    token = world.session()
    tx_id, url = world.held_add(token, "forged-target", VALUE)
    csrf = csrf_of(url)
    origin = origin_of(url)
    attempts = [
        ({"decision": "approve", "password": PASSWORD}, origin),  # no token
        ({"decision": "approve", "password": PASSWORD, "csrf": "x" * 43}, origin),  # wrong one
        ({"decision": "approve", "password": PASSWORD, "csrf": csrf}, "http://evil.example"),
        ({"decision": "approve", "password": PASSWORD, "csrf": csrf}, None),  # no Origin
        ({"decision": "deny", "csrf": csrf, "password": PASSWORD}, "null"),
    ]
    for fields, sent_origin in attempts:
        status, body = post(url, fields, sent_origin)
        assert status == 403, (fields, sent_origin, body)
        assert "refused" in body
    assert "forged-target" not in world.names()
    pending = world.wire("tx.list", {"pending": True})["transactions"]
    assert [t["status"] for t in pending if t["tx_id"] == tx_id] == ["pending"]
    # the same POST from the page's own origin with its token goes through
    status, body = post(url, {"decision": "approve", "password": PASSWORD, "csrf": csrf}, origin)
    assert status == 200, body
    assert "forged-target" in world.names()


def test_the_page_refuses_a_wrong_master_password_and_changes_nothing(world: World) -> None:
    token = world.session()
    _, url = world.held_add(token, "wrong-pw-target", VALUE)
    status, body = post(
        url, {"decision": "approve", "password": "not it", "csrf": csrf_of(url)}, origin_of(url)
    )
    assert status == 403 and "BAD_PASSWORD" in body
    assert "wrong-pw-target" not in world.names()


def test_page_responses_forbid_framing_and_foreign_script(world: World) -> None:
    token = world.session()
    _, url = world.held_add(token, "headers-target", VALUE)
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310
        headers = resp.headers
        page = resp.read().decode()
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in page  # the only script is the same-origin static file
    assert '<script src="/approve-static/page.js" defer></script>' in page


def test_an_expired_link_is_refused_in_the_browser(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    token = world.session()
    tx_id, url = world.held_add(token, "expiring-target", VALUE)
    world.wire("tx.deny", {"tx_id": tx_id})  # decided: the link ends with it
    open_page(browser, url)
    assert "unknown, used or expired" in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.ID, "approve")
    assert post(url, {"decision": "approve", "csrf": "x"}, origin_of(url))[0] in (404, 410)


def test_a_preview_holding_script_and_terminal_escapes_renders_inert(
    world: World, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    token = world.session()
    name = "evil<script>alert(1)</script>\x1b[31mred"
    secrets = {"password": {"value": HOSTILE_VALUE}}
    with pytest.raises(ApmError) as held:
        world.wire(
            "entry.add",
            {
                "type": "login",
                "name": "hostile-entry",
                "notes": name,
                "url": "https://x.example/<img src=x onerror=alert(2)>",
                "secrets": secrets,
            },
            token=SecretStr(token),
        )
    tx_id = held.value.data["tx_id"]
    url = world.wire("approval.link", {"kind": "tx", "id": tx_id}, token=None)["url"]
    open_page(browser, url)
    shot = tmp_path / "hostile.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0
    assert browser.title == "Approve a change?"  # no script ran
    args = browser.find_element(By.ID, "args").text
    assert "<script>alert(1)</script>" in args  # shown as text
    assert "\\x1b[31mred" in args  # the escape made visible, not obeyed
    assert "onerror=alert(2)" in args
    assert not browser.find_elements(By.CSS_SELECTOR, "main script, main img")
    assert HOSTILE_VALUE not in browser.page_source
    assert re.search(r"<secret: \d+ chars, fp [0-9a-f]{8}>", args), args
    world.wire("tx.deny", {"tx_id": tx_id})


def test_denying_a_request_on_the_page_needs_no_password(world: World, browser: Any) -> None:
    import anyio
    from selenium.webdriver.common.by import By

    from .mcp_client import shim_client

    world.wire(
        "entry.add",
        {"type": "api_key", "name": "deny-me", "secrets": {"key": {"value": VALUE}}},
    )
    token = world.session(approve="agent", scope="read")

    async def ask() -> str:
        async with shim_client(world.home, token, "legacy", 20) as client:
            res = await client.call_tool(
                "request_access",
                {"entry": "deny-me", "duration_minutes": 5, "justification": WHY},
            )
            assert isinstance(res.structured_content, dict)
            return str(res.structured_content["request_id"])

    rid = anyio.run(ask)
    listed = world.wire("request.list", {"pending": True})["requests"]
    url = next(r["page_url"] for r in listed if r["id"] == rid)
    assert url and url.startswith("http://localhost:")
    open_page(browser, url)
    assert WHY in browser.find_element(By.TAG_NAME, "table").text
    browser.find_element(By.ID, "deny").click()
    assert status_text(browser).startswith("denied")
    states = {r["id"]: r["state"] for r in world.wire("request.list", {})["requests"]}
    assert states[rid] == "denied"


# ---------------------------------------------------------------------- with a passkey


def cli(world: World, *args: str, password: bool = False) -> tuple[subprocess.Popen[str], str]:
    """A real `apm` command that opens the page: started, and the link it prints read back."""
    argv = [sys.executable, "-m", "broker.cli.main", *args, "--no-browser", "--wait", "60"]
    if password:
        argv.append("--password-stdin")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(world.home),
    )
    assert proc.stdin is not None and proc.stderr is not None
    if password:
        proc.stdin.write(PASSWORD + "\n")
    proc.stdin.close()
    line = proc.stderr.readline()
    found = re.search(r"(http://localhost:\d+/approve/\S+)", line)
    assert found, line + proc.stderr.read()
    return proc, found.group(1)


def finished(proc: subprocess.Popen[str]) -> int:
    code = proc.wait(timeout=60)
    assert proc.stderr is not None and proc.stdout is not None
    detail = proc.stderr.read() + proc.stdout.read()
    assert code == 0, detail
    proc.stderr.close()
    proc.stdout.close()
    return code


# registers the module's passkey: kept last, the tests above need a vault without one
def test_a_passkey_registered_in_the_browser_approves_a_held_write_which_then_lands(
    world: World, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    adding, url = cli(world, "passkey", "add", password=True)
    open_page(browser, url)
    virtual_authenticator(browser)
    browser.find_element(By.ID, "passkey-register").click()
    assert status_text(browser) == "passkey registered"
    assert finished(adding) == 0
    assert len(world.wire("passkey.list", {}, token=None)["passkeys"]) == 1
    # the registration link was used up
    open_page(browser, url)
    assert "unknown, used or expired" in browser.find_element(By.ID, "status").text

    token = world.session()
    tx_id, url = world.held_add(token, "lands-with-passkey", VALUE)
    listed = world.apm.ok("tx", "ls", "--pending").stdout
    assert f"page (this machine): {url}" in listed
    open_page(browser, url)
    # with a passkey registered the page no longer takes the password
    assert not browser.find_elements(By.ID, "password")
    status, _ = post(
        url, {"decision": "approve", "password": PASSWORD, "csrf": csrf_of(url)}, origin_of(url)
    )
    assert status == 403 and "lands-with-passkey" not in world.names()

    # `apm tx approve --passkey` opens the same page and returns once it is decided there
    approving, opened = cli(world, "tx", "approve", tx_id, "--passkey")
    assert opened == url
    open_page(browser, url)
    browser.find_element(By.ID, "passkey-approve").click()
    assert status_text(browser).startswith("approved"), browser.page_source
    assert finished(approving) == 0
    assert "lands-with-passkey" in world.names()
    got = world.wire("entry.get", {"ref": "lands-with-passkey"})
    assert got["value"] == VALUE
    records = (world.home / "state" / "audit.jsonl").read_text()
    assert "tx.approved" in records and VALUE not in records


def test_with_a_passkey_denying_a_write_on_the_page_uses_it_too(world: World, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    registered = world.wire("passkey.list", {}, token=None)["passkeys"]
    assert registered, "runs after the registration test above (file order, one browser)"
    token = world.session()
    tx_id, url = world.held_add(token, "denied-with-passkey", VALUE)
    open_page(browser, url)
    browser.find_element(By.ID, "deny").click()
    assert status_text(browser).startswith("denied"), browser.page_source
    states = {t["tx_id"]: t["status"] for t in world.wire("tx.list", {})["transactions"]}
    assert states[tx_id] == "denied"
    assert "denied-with-passkey" not in world.names()


def test_an_unregistered_passkey_or_a_made_up_assertion_approves_nothing(
    world: World, browser: Any
) -> None:
    """The attack: approve with an authenticator the vault does not know, or POST an
    assertion made up by a process that has the link and the page's token."""
    from selenium.webdriver.common.by import By

    token = world.session()
    _, first = world.held_add(token, "replay-one", VALUE)
    _, second = world.held_add(token, "replay-two", VALUE)
    open_page(browser, first)
    virtual_authenticator(browser)  # a fresh authenticator: not the registered credential
    browser.find_element(By.ID, "passkey-approve").click()
    assert "failed" in status_text(browser) or "PERMISSION_DENIED" in status_text(browser)
    assert "replay-one" not in world.names()
    # a made-up assertion, with a valid token and origin, is refused by the gate
    forged = json.dumps({"id": "AAAA", "rawId": "AAAA", "type": "public-key", "response": {}})
    status, body = post(
        second,
        {"decision": "approve", "assertion": forged, "csrf": csrf_of(second)},
        origin_of(second),
    )
    assert status == 403 and "PERMISSION_DENIED" in body
    assert "replay-two" not in world.names()


def test_removing_the_passkey_needs_the_owner_and_brings_back_the_password(
    world: World, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    listed = world.wire("passkey.list", {}, token=None)["passkeys"]
    assert len(listed) == 1
    session = SecretStr(world.session(approve="agent", scope="admin"))
    with pytest.raises(ApmError) as refused:
        world.wire("passkey.remove", {"id": listed[0]["id"]}, token=session)
    assert refused.value.code == "PERMISSION_DENIED"
    # ids may start with "-" (random base64url): the id goes after "--", options before it
    world.apm(
        "passkey",
        "rm",
        "--password-stdin",
        "--",
        listed[0]["id"],
        stdin=PASSWORD + "\n",
        check=True,
    )
    assert world.wire("passkey.list", {}, token=None)["passkeys"] == []
    _, url = world.held_add(world.session(), "after-removal", VALUE)
    open_page(browser, url)
    assert browser.find_elements(By.ID, "password")
    assert not browser.find_elements(By.ID, "passkey-approve")
