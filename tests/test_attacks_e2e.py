"""Issue #13 attacks 10 and 13, run against real processes (the in-process twins of these
checks live in test_sessions.py and test_requests.py).

- #13.10: the throttle was keyed by the Unix session and one valid call reset it, so `setsid`
  on every guess made it free; `session.diagnose` answered anyone about any session. Here a
  loop of short-lived processes, each in its own new session (`setsid`), sends a wrong token
  on a raw wire frame to the real broker's socket, with a valid call between guesses; the
  broker's `throttle_failures` (`apm status --json`, the caller's uid) shows every guess
  counted. No timing is asserted: the count is the observable.
- #13.13: a grant on a TOTP entry gave the seed. Here the real shim (through the SDK's stdio
  client) asks for a TOTP entry, the person approves with the real CLI, and codes come out
  while the seed does not, through the MCP tools and through `apm run`; only a request that
  names the seed field, shown as such by `apm request ls`, lets the seed through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import types as mt
from pydantic import SecretStr

from broker.cli.client import BrokerClient, request_frame

from .conftest import PASSWORD, PY, Apm, Broker, clean_env, register_secret
from .mcp_client import error_body, ok_of, request_access, shim_client, whole

pytestmark = pytest.mark.slow

CALL_TIMEOUT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wire(home: Path, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """An owner call (master password) through the real client library."""
    with BrokerClient(f"ipc://{home}/run/broker.sock") as client:
        return client.call_raw(method, params or {}, password=SecretStr(PASSWORD), timeout=30)


def delegate(home: Path, scope: str, label: str, **extra: Any) -> tuple[str, str]:
    """A new session's (token, accessor)."""
    res = wire(
        home, "session.create", {"scope": scope, "ttl_seconds": 3600, "label": label, **extra}
    )
    register_secret(res["token"])
    return str(res["token"]), str(res["session"]["accessor"])


def failures(apm: Apm) -> int:
    """What the broker counts against this uid (the CLI runs as the test's uid)."""
    return int(json.loads(apm.ok("status", "--json", password=None).stdout)["throttle_failures"])


# ---------------------------------------------------------------------- #13.10 throttle

# A short-lived client in its own Unix session: reads one frame (hex) on stdin, so a token
# never sits in argv, sends it on a bare DEALER, and prints its session id and the reply.
RAW_CLIENT = """\
import json, os, sys
import zmq
frame = bytes.fromhex(sys.stdin.read().strip())
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
sock.send(frame)
reply = sock.recv() if sock.poll(60000) else b"null"
sock.close(linger=0)
ctx.term()
sys.stdout.write(json.dumps({"sid": os.getsid(0), "pid": os.getpid(), "reply": json.loads(reply)}))
"""


def in_new_session(broker: Broker, frame: bytes) -> dict[str, Any]:
    """One attempt from a fresh process in a new Unix session (`setsid`): its sid and reply."""
    proc = subprocess.run(
        ["setsid", "--wait", PY, "-c", RAW_CLIENT, f"ipc://{broker.socket}"],
        input=frame.hex(),
        capture_output=True,
        text=True,
        env=clean_env(broker.home),
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["reply"] is not None, "the broker did not answer"
    return out


def frame(method: str, params: dict[str, Any] | None = None, token: str | None = None) -> bytes:
    return request_frame(
        method, params or {}, token=SecretStr(token) if token else None, client="attack"
    )[1]


def guess() -> str:
    return "eps_" + uuid.uuid4().hex + uuid.uuid4().hex  # the shape of a token, but no session


def test_setsid_per_guess_and_valid_calls_in_between_do_not_reset_the_throttle(
    vault: Broker, apm: Apm
) -> None:
    token, _ = delegate(vault.home, "read", "throttle-victim")
    key = {"key": {"value": "throttle-Entry-4411"}}
    register_secret(key["key"]["value"])
    wire(vault.home, "entry.add", {"type": "api_key", "name": "k", "secrets": key})
    assert failures(apm) == 0
    sessions = {os.getsid(0)}
    for n in range(1, 6):
        bad = in_new_session(vault, frame("entry.list", token=guess()))
        assert bad["reply"]["error"]["code"] == "SESSION_REQUIRED", bad
        assert bad["reply"]["ok"] is False
        # the attack's other half: a valid call, also from a new session, right after
        good = in_new_session(vault, frame("entry.list", token=token))
        assert good["reply"]["ok"] is True, good
        assert [e["name"] for e in good["reply"]["result"]["entries"]] == ["k"]
        # every attempt ran in a session of its own (setsid made it a session leader)...
        for attempt in (bad, good):
            assert attempt["sid"] == attempt["pid"]
            assert attempt["sid"] not in sessions
            sessions.add(attempt["sid"])
        # ...and still every guess is counted against the uid, none forgiven by the valid call
        assert failures(apm) == n
    # the count is visible to a caller of this uid only as a number: no token, no accessor
    status = apm.ok("status", "--json", password=None).stdout
    assert token not in status


def test_session_diagnose_tells_a_caller_without_the_token_nothing(vault: Broker, apm: Apm) -> None:
    # the victim: an admin session bound to a process that is none of ours, so a leak of its
    # accessor, scope, state or which binding fails would show in the answer
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        victim_token, victim = delegate(vault.home, "admin", "diag-victim", pid=sleeper.pid)
        attacker_token, attacker = delegate(vault.home, "read", "diag-attacker")
        assert failures(apm) == 0

        # control: the holder of the victim's token is told what its token is (so the
        # fields below would show a leak)
        own = in_new_session(vault, frame("session.diagnose", token=victim_token))["reply"]
        assert own["result"]["known"] is True
        assert own["result"]["accessor"] == victim
        assert own["result"]["scope"] == "admin"
        assert own["result"]["problem"]  # the pid binding refuses this process
        assert failures(apm) == 0

        def tells_nothing(reply: dict[str, Any]) -> None:
            text = json.dumps(reply)
            assert victim not in text
            assert "admin" not in text
            assert "pid" not in json.dumps(reply.get("result", {}))
            if "result" in reply:
                res = reply["result"]
                assert res["known"] is False
                for key in ("accessor", "state", "scope", "expires_at"):
                    assert res.get(key) is None, (key, res)

        # 1. no token at all
        none = in_new_session(vault, frame("session.diagnose"))["reply"]
        tells_nothing(none)
        # 2. the victim's accessor (what `apm session ls` and audit records show) as the token
        as_token = in_new_session(vault, frame("session.diagnose", token=victim))["reply"]
        tells_nothing(as_token)
        assert failures(apm) == 1
        # 3. the victim's accessor named in the params, with no token or with the
        #    attacker's own token: the method takes no parameters
        for tok in (None, attacker_token):
            named = frame("session.diagnose", {"accessor": victim}, token=tok)
            reply = in_new_session(vault, named)["reply"]
            assert reply["error"]["code"] == "INVALID_PARAMETERS", reply
            tells_nothing(reply)
        # the attacker's own token tells about the attacker's session, never the victim's
        mine = in_new_session(vault, frame("session.diagnose", token=attacker_token))["reply"]
        assert mine["result"]["accessor"] == attacker
        assert mine["result"]["scope"] == "read"
        assert victim not in json.dumps(mine)
        # 4. guessed tokens, each from a new session: nothing, and every one counted
        for n in range(2, 5):
            tells_nothing(in_new_session(vault, frame("session.diagnose", token=guess()))["reply"])
            assert failures(apm) == n
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------- #13.13 TOTP seed

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits, base32
WHY = "log in to the build account for the release"
register_secret(SEED)


def code_of(result: mt.CallToolResult) -> str:
    return str(error_body(result)["code"])


def child(out: Path, name: str) -> list[str]:
    """A python child that records what it received in its environment under `name`."""
    script = f"import os\nopen({str(out)!r}, 'w').write(os.environ.get({name!r}, ''))\n"
    return [sys.executable, "-c", script]


@pytest.fixture
def totp_vault(vault: Broker) -> Iterator[Broker]:
    secrets = {"secret": {"value": SEED}}
    wire(vault.home, "entry.add", {"type": "totp", "name": "github-2fa", "secrets": secrets})
    yield vault


def pending_row(apm: Apm, rid: str) -> dict[str, Any]:
    rows = json.loads(apm.ok("request", "ls", "--pending", "--json").stdout)
    mine = [r for r in rows if r["id"] == rid]
    assert len(mine) == 1, rows
    return dict(mine[0])


def human_line(apm: Apm, rid: str) -> str:
    text = apm.ok("request", "ls", "--pending").stdout
    lines = [line for line in text.splitlines() if rid in line]
    assert lines, text
    return "\n".join(lines)


@pytest.mark.anyio
async def test_a_grant_on_a_totp_entry_gives_codes_and_never_the_seed(
    totp_vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    home = totp_vault.home
    token, _ = delegate(home, "read", "totp-agent")
    env = clean_env(home, APM_EPHEMERAL_ID=token)
    out = tmp_path / "received"
    async with shim_client(home, token, "auto", CALL_TIMEOUT) as client:
        # before any grant: no codes either
        assert code_of(await client.call_tool("get_totp", {"entry": "github-2fa"})) == (
            "PERMISSION_DENIED"
        )
        # `reveal`: the value may reach the model (a `use` grant never opens get_totp at all)
        rid = await request_access(client, "github-2fa", WHY, access="reveal")
        row = pending_row(apm, rid)
        assert (row["entry"], row["field"], row["totp_seed"]) == ("github-2fa", None, False)
        assert "SEED" not in human_line(apm, rid)
        apm.ok("request", "approve", rid)

        # codes: yes
        totp = ok_of(await client.call_tool("get_totp", {"entry": "github-2fa"}))
        assert str(totp["code"]).isdigit() and len(str(totp["code"])) >= 6
        assert SEED not in whole(await client.call_tool("get_totp", {"entry": "github-2fa"}))

        # the attack: the seed through every path that opens a field
        for extra in ({}, {"field": "secret"}):
            res = await client.call_tool("decrypt_entry", {"entry": "github-2fa", **extra})
            assert code_of(res) == "PERMISSION_DENIED", extra
            assert SEED not in whole(res)
            res = await client.call_tool(
                "get_entry", {"entry": "github-2fa", "include_secret": True, **extra}
            )
            assert code_of(res) == "PERMISSION_DENIED", extra
            assert SEED not in whole(res)
    for ref in ("apm://default/github-2fa/secret", "apm://default/github-2fa"):
        run = apm("run", "--env", f"SEED={ref}", "--", *child(out, "SEED"), env=env)
        assert run.returncode == 5, (ref, run.stderr)  # PERMISSION_DENIED
        assert not out.exists()
        assert SEED not in run.stdout + run.stderr


@pytest.mark.anyio
async def test_the_seed_comes_only_from_a_request_that_named_it_and_the_approver_saw_that(
    totp_vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    home = totp_vault.home
    token, _ = delegate(home, "read", "seed-agent")
    env = clean_env(home, APM_EPHEMERAL_ID=token)
    out = tmp_path / "received"
    async with shim_client(home, token, "legacy", CALL_TIMEOUT) as client:
        rid = await request_access(client, "github-2fa", WHY, field="secret", access="reveal")
        # what the person sees before approving: the seed itself, not only codes
        row = pending_row(apm, rid)
        assert (row["entry"], row["field"], row["totp_seed"]) == ("github-2fa", "secret", True)
        assert "the TOTP SEED itself, not only codes" in human_line(apm, rid)
        # not yet approved: nothing
        res = await client.call_tool("decrypt_entry", {"entry": "github-2fa"})
        assert code_of(res) == "PERMISSION_DENIED"
        apm.ok("request", "approve", rid)

        got = ok_of(await client.call_tool("decrypt_entry", {"entry": "github-2fa"}))
        assert got["value"] == SEED
        assert str(
            ok_of(await client.call_tool("get_totp", {"entry": "github-2fa"}))["code"]
        ).isdigit()
    run = apm(
        "run", "--env", "SEED=apm://default/github-2fa/secret", "--", *child(out, "SEED"), env=env
    )
    assert run.returncode == 0, run.stderr
    assert out.read_text() == SEED
    out.unlink()
