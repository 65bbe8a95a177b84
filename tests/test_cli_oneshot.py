"""The lean one-shot path (`apm get|totp|run` with a session) against the full CLI path.

- it loads no pydantic, no wire models and no other command module (a probe of sys.modules in
  a real `apm` process talking to a real broker);
- its frames are the frames the pydantic models encode;
- it and the full path print the same thing and exit with the same code, on success and on every
  error class: each wire code answered by a scripted broker, the common ones by a real broker,
  and the client-side checks the models make.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.cli import client as cli_client
from broker.cli import oneshot
from broker.cli.main import main
from broker.wire import errors
from broker.wire import limits as wire_limits
from broker.wire.entries import FIELD_NAME_PATTERN, NAME_MAX, SPACE_PATTERN
from broker.wire.protocol import (
    PROTOCOL_VERSION,
    Auth,
    EntryGetParams,
    EntryRef,
    Request,
    SecretResolveParams,
)

from .conftest import PASSWORD, Apm, Broker, register_secret
from .mcp_world import add_api_key, wire

pytestmark = pytest.mark.slow

TOTP_SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits
VALUE = "sk-oneshot-4f1d2c"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def session(vault: Broker, apm: Apm, home: Path) -> dict[str, str]:
    """A vault with a few entries; a `secrets` and a `read` session's tokens, by scope. The
    api_key entries and the space are set up over the wire (a CLI run costs ~0.4 CPU-s)."""
    add_api_key(home, "svc", VALUE)
    apm.ok("add", "totp", "otp", "--from-stdin", stdin=TOTP_SEED + "\n")
    wire(home, "space.add", {"name": "other"})
    register_secret("sk-other-91")
    other = {"type": "api_key", "name": "svc", "space": "other"}
    wire(home, "entry.add", {**other, "secrets": {"key": {"value": "sk-other-91"}}})
    add_api_key(home, "solo", "sk-solo-value-3")
    tokens = {}
    for scope in ("secrets", "read"):
        out = apm.ok("delegate", "--scope", scope, "--json").stdout
        tokens[scope] = json.loads(out)["token"]
    return tokens


def _run(argv: list[str], capfd: pytest.CaptureFixture[str], *, lean: bool) -> tuple[int, str, str]:
    code = main(argv, lean=lean)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = capfd.readouterr()
    return code, out, err


def _both(
    argv: list[str], capfd: pytest.CaptureFixture[str]
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    assert oneshot.parse(argv) is not None, "the lean path must take this command"
    return _run(argv, capfd, lean=True), _run(argv, capfd, lean=False)


@pytest.fixture
def as_session(
    home: Path, session: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    for k in list(os.environ):
        if k.startswith("APM_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("APM_HOME", str(home))
    monkeypatch.setenv("APM_EPHEMERAL_ID", session["secrets"])
    return session


# ---------------------------------------------------------------- imports


def _modules_after(argv: list[str], env: dict[str, str], tmp: Path) -> set[str]:
    dump = tmp / "modules.json"
    code = (
        "import atexit, json, sys\n"
        f"out = open({str(dump)!r}, 'w')\n"
        "atexit.register(lambda: out.write(json.dumps(sorted(sys.modules))) and out.close())\n"
        "from broker.cli.main import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(dump.read_text()))


LEAN_CLI = {"broker.cli", "broker.cli.main", "broker.cli.oneshot", "broker.cli.auth"}
LEAN_CLI |= {"broker.cli.client", "broker.cli.run_cmd", "broker.cli.masking", "broker.cli.parser"}
LEAN_CLI |= {"broker.cli.raw_calls"}  # the calls the lean path and `apm run` share
HEAVY = ["pydantic", "pydantic_core", "broker.wire.protocol", "broker.wire.entries"]
HEAVY += ["cryptography", "mcp", "psutil", "uuid", "getpass"]


HOT_ARGVS = [
    ["get", "solo"],
    ["totp", "otp"],
    ["run", "--env", "K=apm://default/solo/key", "--", sys.executable, "-c", "pass"],
]


def test_hot_commands_with_a_session_load_no_pydantic_and_no_other_command_module(
    home: Path, session: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env |= {"APM_HOME": str(home), "APM_EPHEMERAL_ID": session["secrets"]}
    for argv in HOT_ARGVS:
        loaded = _modules_after(argv, env, tmp_path)
        assert "broker.cli.oneshot" in loaded and "zmq" in loaded
        heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
        assert heavy == [], argv[0]
        others = sorted(m for m in loaded if m.startswith("broker.cli") and m not in LEAN_CLI)
        assert others == [], argv[0]
    # the probe sees what the full path loads
    loaded = _modules_after(["ls"], env, tmp_path)
    assert {"pydantic", "broker.wire.protocol", "broker.cli.entry_cmd"} <= loaded


# ---------------------------------------------------------------- frames


def test_lean_frames_are_the_frames_the_models_encode() -> None:
    assert cli_client.PROTOCOL_VERSION == PROTOCOL_VERSION
    assert wire_limits.NAME_MAX == NAME_MAX
    assert (wire_limits.SPACE_PATTERN, wire_limits.FIELD_NAME_PATTERN) == (
        SPACE_PATTERN,
        FIELD_NAME_PATTERN,
    )
    from pydantic import SecretStr

    from broker.cli.auth import Token

    cases: list[tuple[str, dict[str, Any], Any]] = [
        ("entry.get", oneshot.entry_ref("svc", None), EntryGetParams(ref="svc")),
        (
            "entry.get",
            oneshot.entry_ref("svc", "other", field="key"),
            EntryGetParams(ref="svc", space="other", field="key"),
        ),
        ("entry.totp", oneshot.entry_ref("otp", "default"), EntryRef(ref="otp", space="default")),
        (
            "secret.resolve",
            {"refs": ["apm://default/svc/key"]},
            SecretResolveParams(refs=["apm://default/svc/key"]),
        ),
    ]
    for method, lean_params, model in cases:
        for agent in (None, "claude-code"):
            req_id, frame = cli_client.request_frame(
                method, lean_params, token=Token("eps_tok"), agent=agent, client="apm-cli/x"
            )
            full = Request(
                v=PROTOCOL_VERSION,
                id=req_id,
                method=method,
                params=json.loads(
                    model.model_dump_json(context={"reveal": True}, exclude_none=True)
                ),
                auth=Auth(token=SecretStr("eps_tok"), agent=agent),
                client="apm-cli/x",
            )
            assert json.loads(frame) == json.loads(full.encode())
            assert re.fullmatch(r"[0-9a-f]{32}", req_id)
            Request.model_validate_json(frame)  # the broker's own parse accepts it


# ---------------------------------------------------------------- every wire error class


@pytest.fixture
def scripted_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[dict[str, Any]]]:
    """A ROUTER that answers each request with the next scripted reply body ({ok, ...})."""
    replies: list[dict[str, Any]] = []
    sock_path = tmp_path / "b.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{sock_path}")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, frame = router.recv_multipart()
            req = json.loads(frame)
            body = replies.pop(0) if replies else {"ok": True, "result": {}}
            router.send_multipart([ident, json.dumps({"v": 1, "id": req["id"], **body}).encode()])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    for k in list(os.environ):
        if k.startswith("APM_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("APM_HOME", str(tmp_path))
    monkeypatch.setenv("APM_BROKER_ADDR", f"ipc://{sock_path}")
    monkeypatch.setenv("APM_EPHEMERAL_ID", "eps_scripted")
    yield replies
    stop.set()
    t.join(timeout=5)
    router.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("code", [*sorted(errors.ERRORS), "SOME_FUTURE_CODE"])
@pytest.mark.parametrize("command", ["get", "totp"])
def test_lean_and_full_paths_agree_on_every_wire_error(
    code: str,
    command: str,
    scripted_broker: list[dict[str, Any]],
    capfd: pytest.CaptureFixture[str],
) -> None:
    err = {"code": code, "message": f"{code.lower()} happened", "data": {"x": 1}}
    if code != "CANCELLED":
        err["hint"] = f"do something about {code.lower()}"
    scripted_broker.extend([{"ok": False, "error": err}] * 2)
    lean, full = _both([command, "svc"], capfd)
    assert lean == full
    exit_code, out, stderr = lean
    expected = errors.ERRORS.get(code, errors.InternalError).exit_code
    assert exit_code == expected and out == ""
    assert f"apm: error: {code.lower()} happened\n" in stderr


def test_lean_and_full_paths_agree_on_scripted_successes(
    scripted_broker: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    got = {"ok": True, "result": {"id": "e1", "name": "svc", "field": "key", "value": "v\x00 x"}}
    totp = {
        "ok": True,
        "result": {"id": "e2", "name": "otp", "code": "012345", "remaining": 7, "period": 30},
    }
    for argv, reply in (
        (["get", "svc"], got),
        (["get", "svc", "-n", "--field", "key"], got),
        (["totp", "otp"], totp),
        (["totp", "otp", "--json"], totp),
    ):
        scripted_broker.extend([reply, reply])
        lean, full = _both(argv, capfd)
        assert lean == full
        assert lean[0] == 0 and lean[1]


# ---------------------------------------------------------------- a real broker


def _norm(result: tuple[int, str, str]) -> tuple[int, str, str]:
    """TOTP codes and seconds may tick between the two runs."""
    code, out, err = result
    return code, re.sub(r"\d", "#", out), re.sub(r"\d", "#", err)


REAL_CASES = [
    ["get", "solo"],
    ["get", "solo", "-n"],
    ["get", "svc", "--space", "other", "--field", "key"],
    ["get", "svc"],  # AMBIGUOUS_ENTRY
    ["get", "nope"],  # ENTRY_NOT_FOUND
    ["get", "solo", "--space", "nospace"],
    ["get", "solo", "--field", "nofield"],
    ["get", "solo", "--field", "bad field!"],  # checked before sending, as the model does
    ["get", "solo", "--space", "bad space"],
    ["get", ""],
    ["get", "x" * 201],
    ["get", "x" * 201, "--space", "a b", "--field", "c d"],
    ["totp", "otp"],
    ["totp", "otp", "--json"],
    ["totp", "solo"],  # not a TOTP entry
    ["totp", "nope", "--space", "other"],
    ["totp", "otp", "--space", "bad/space"],
]


def test_lean_and_full_paths_agree_with_a_real_broker(
    as_session: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    exits = []
    for argv in REAL_CASES:
        lean, full = _both(argv, capfd)
        assert _norm(lean) == _norm(full), argv
        exits.append(lean[0])
    assert exits[:3] == [0, 0, 0] and set(exits[3:12]) == {6, 10}


def test_lean_and_full_paths_agree_on_session_and_lock_errors(
    as_session: dict[str, str],
    apm: Apm,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcomes = {}
    monkeypatch.setenv("APM_EPHEMERAL_ID", as_session["read"])
    outcomes["read scope"] = _both(["get", "solo"], capfd)
    monkeypatch.setenv("APM_EPHEMERAL_ID", "eps_" + "x" * 43)
    outcomes["bad token"] = _both(["get", "solo"], capfd)
    monkeypatch.setenv("APM_EPHEMERAL_ID", as_session["secrets"])
    apm.ok("lock", password=None)
    outcomes["locked"] = _both(["get", "solo"], capfd)
    monkeypatch.setenv("APM_BROKER_ADDR", "ipc:///nonexistent/apm.sock")
    outcomes["no broker"] = _both(["totp", "otp"], capfd)
    exits = {}
    for what, (lean, full) in outcomes.items():
        assert lean == full, what
        exits[what] = lean[0]
    assert exits == {"read scope": 5, "bad token": 5, "locked": 3, "no broker": 9}


def _run_apm(argv: list[str], env: dict[str, str], *, lean: bool) -> tuple[int, str, str]:
    # a process of its own: `apm run` wires the child's pipes to this process's stdout/stderr
    code = f"import sys\nfrom broker.cli.main import main\nsys.exit(main({argv!r}, lean={lean}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_lean_run_resolves_masks_and_matches_the_full_path(
    home: Path, session: dict[str, str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env |= {"APM_HOME": str(home), "APM_EPHEMERAL_ID": session["secrets"]}
    child = "import os; print(os.environ['K'], 'APM_EPHEMERAL_ID' in os.environ)"
    ok = ["run", "--env", "K=apm://default/solo/key", "--", sys.executable, "-c", child]
    too_many = ["run", *[f"--env=K{i}=apm://default/x{i}/key" for i in range(65)], "--", "true"]
    missing = ["run", "--env", "K=apm://default/nope/key", "--", "true"]
    results = {}
    for name, argv in (("ok", ok), ("too many", too_many), ("missing", missing)):
        lean, full = _run_apm(argv, env, lean=True), _run_apm(argv, env, lean=False)
        assert lean == full, name
        results[name] = lean
    assert results["ok"] == (0, "<concealed by apm> False\n", "")
    assert results["too many"][0] == errors.InvalidParameters.exit_code
    assert "invalid value for refs" in results["too many"][2]
    assert results["missing"][0] == errors.EntryNotFound.exit_code


def test_owner_flag_or_no_session_takes_the_full_path(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APM_EPHEMERAL_ID", "eps_" + "y" * 43)
    assert oneshot.parse(["get", "x"]) is not None
    assert oneshot.parse(["get", "x", "--password-stdin"]) is None
    assert oneshot.parse(["get", "x", "--password-s"]) is None  # argparse's abbreviation
    assert oneshot.parse(["ls"]) is None
    monkeypatch.delenv("APM_EPHEMERAL_ID")
    assert oneshot.parse(["get", "x"]) is None


def test_lean_and_full_get_help_are_the_same(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APM_EPHEMERAL_ID", "eps_" + "y" * 43)
    helps = []
    for lean in (True, False):
        with pytest.raises(SystemExit):
            main(["get", "--help"], lean=lean)
        helps.append(capfd.readouterr().out)
    assert helps[0] == helps[1] and "--no-newline" in helps[0]


def test_owner_get_through_the_full_path_still_works(session: dict[str, str], apm: Apm) -> None:
    register_secret(PASSWORD)
    assert apm.ok("get", "solo").stdout == "sk-solo-value-3\n"
