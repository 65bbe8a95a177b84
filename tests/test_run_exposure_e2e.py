"""#13.9 end to end: `apm run` and the `apm-mcp` shim do not hand their session token to other
processes through /proc/<pid>/environ.

The attack of the review: `apm run --env X=apm://... -- sh -c 'tr "\\0" "\\n" </proc/$PPID/environ'`
printed APM_EPHEMERAL_ID, and a sibling of the shim (the AI client's shell tool) read it from
/proc/<shim>/environ. Two defences, each tested where it is the one that matters:
- as root (we are root; CI too), which ignores non-dumpable: the token's bytes are gone from
  the initial environment block (the scrub);
- as another, unprivileged uid (created with useradd), the attacker being a process of that
  same uid: /proc/<pid>/environ is not readable at all (PR_SET_DUMPABLE 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import broker
import shim

from . import other_uid as other_uid_
from .conftest import Apm, Broker, clean_env, register_secret
from .mcp_client import INITIALIZE, SHIM

pytestmark = pytest.mark.slow

TEST_USER = "apmterm"
DB_KEY = "Prod-Db-Key-4471-unique"
FAKE_TOKEN = "eps_" + "Zq7" * 15  # what another uid's processes hold; never reaches a broker
register_secret(DB_KEY)


def need_root() -> None:
    other_uid_.need_root("needs root (to read other processes' /proc and to create a test user)")


def environ_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def delegate(apm: Apm, scope: str = "secrets") -> str:
    out = json.loads(apm.ok("delegate", "--scope", scope, "--ttl", "1h", "--json").stdout)
    register_secret(out["token"])
    return str(out["token"])


@contextlib.contextmanager
def running_shim(
    argv: list[str], env: dict[str, str], **kw: object
) -> Iterator[subprocess.Popen[bytes]]:
    """A shim that has answered `initialize`: by then its main() has run its first lines."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert b'"id":1' in answer.replace(b" ", b""), (answer, proc.stderr)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------- as root: the scrub


def test_apm_runs_child_finds_no_token_in_its_parents_environ_block(
    vault: Broker, apm: Apm
) -> None:
    need_root()
    apm.ok("add", "api_key", "proddb", "--from-stdin", stdin=DB_KEY + "\n")
    token = delegate(apm)
    script = 'tr "\\0" "\\n" </proc/$PPID/environ; echo "child-sees-X=$X"'
    proc = apm(
        "run",
        "--env",
        "X=apm://default/proddb/key",
        "--",
        "sh",
        "-c",
        script,
        env=clean_env(apm.home, APM_EPHEMERAL_ID=token),
    )
    assert proc.returncode == 0, proc.stderr
    assert "child-sees-X=<concealed by apm>" in proc.stdout  # it did resolve with the session
    assert "APM_HOME=" in proc.stdout  # it did read the parent's environment block
    assert token not in proc.stdout
    assert "APM_EPHEMERAL_ID" not in proc.stdout


def test_the_shims_environ_block_no_longer_holds_its_token_and_it_still_works(
    vault: Broker, apm: Apm
) -> None:
    need_root()
    token = delegate(apm, "read")
    env = clean_env(apm.home, APM_EPHEMERAL_ID=token)
    with running_shim([str(SHIM)], env) as proc:
        seen = environ_of(proc.pid)  # what a sibling (root here) reads
        assert b"APM_HOME=" in seen
        assert token.encode() not in seen and b"APM_EPHEMERAL_ID" not in seen
        # the shim kept the token in memory: the broker's real catalog comes back
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        proc.stdin.write(b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}\n')
        proc.stdin.flush()
        listing = proc.stdout.readline()
        assert b"list_entries" in listing, listing


# ---------------------------------------------------------------------- as another uid


@pytest.fixture(scope="module")
def other_uid() -> Iterator[tuple[pwd.struct_passwd, str, Path]]:
    """(the test user, an interpreter it may run, a world-readable copy of apm + its imports)."""
    need_root()
    user = other_uid_.ensure_user(TEST_USER)
    with other_uid_.public_dir("apmx-") as work:
        code = work / "code"
        for pkg in (broker, shim):
            other_uid_.publish(Path(pkg.__file__).parent, code / pkg.__name__)
        site = Path(zmq.__file__).resolve().parent.parent
        for name in (
            "zmq",
            "pyzmq.libs",
            "pydantic",
            "pydantic_core",
            "annotated_types",
            "typing_inspection",
            "typing_extensions.py",
            "psutil",
        ):
            if (site / name).exists():
                other_uid_.publish(site / name, code / name)
        code.chmod(0o755)
        home = work / "home"
        home.mkdir(mode=0o700)
        os.chown(home, user.pw_uid, user.pw_gid)
        interp = other_uid_.python_for(user, "import ctypes", work)
        if interp is None:
            pytest.fail(f"no Python that user {user.pw_name} may run: install python3 from the OS")
        yield user, interp, work


def _as_user(
    setup: tuple[pwd.struct_passwd, str, Path], module: str, args: list[str], **kw: object
) -> list[str]:
    _, interp, work = setup
    boot = (
        f"import runpy, sys; sys.path[:0] = [{str(work / 'code')!r}]; "
        f"sys.argv = [{module!r}, *sys.argv[1:]]; runpy.run_module({module!r}, run_name='__main__')"
    )
    return [interp, "-I", "-c", boot, *args]


def _user_kw(setup: tuple[pwd.struct_passwd, str, Path]) -> dict[str, object]:
    user, _, work = setup
    return other_uid_.as_user(user, work)


def _user_env(setup: tuple[pwd.struct_passwd, str, Path]) -> dict[str, str]:
    _, _, work = setup
    return {
        **other_uid_.PLAIN_ENV,
        "APM_HOME": str(work / "home"),
        "APM_EPHEMERAL_ID": FAKE_TOKEN,
    }


def _probe_as_user(
    setup: tuple[pwd.struct_passwd, str, Path], probe: str, pid: int, timeout: float
) -> Any:
    """Run the Python code `probe` (json and sys imported, apm's copy importable, `pid` in
    sys.argv[1]) as the test user; what it printed, as JSON."""
    _, interp, work = setup
    head = f"import json, sys; sys.path[:0] = [{str(work / 'code')!r}]\n"
    out = subprocess.run(
        [interp, "-I", "-c", head + probe, str(pid)],
        env=other_uid_.PLAIN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **_user_kw(setup),  # type: ignore[arg-type]
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_apm_runs_child_of_the_same_uid_cannot_read_its_parents_environ(
    other_uid: tuple[pwd.struct_passwd, str, Path],
) -> None:
    script = "cat /proc/$PPID/environ >/dev/null 2>&1 && echo READABLE || echo DENIED"
    argv = _as_user(other_uid, "broker.cli.main", ["run", "--", "sh", "-c", script])
    proc = subprocess.run(
        argv,
        env=_user_env(other_uid),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **_user_kw(other_uid),  # type: ignore[arg-type]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "DENIED"


def test_a_sibling_of_the_same_uid_cannot_read_the_shims_environ(
    other_uid: tuple[pwd.struct_passwd, str, Path],
) -> None:
    argv = _as_user(other_uid, "shim.main", [])
    # no broker for this user: the shim answers initialize itself (apm_status)
    with running_shim(argv, _user_env(other_uid), **_user_kw(other_uid)) as proc:
        sibling = subprocess.run(
            [
                "sh",
                "-c",
                f"cat /proc/{proc.pid}/environ >/dev/null 2>&1 && echo READABLE || echo DENIED",
            ],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            **_user_kw(other_uid),  # type: ignore[arg-type]
        )
        assert sibling.stdout.strip() == "DENIED"
        # and root, which non-dumpable does not stop, finds the block scrubbed
        assert FAKE_TOKEN.encode() not in environ_of(proc.pid)
        # a broker of this uid still sees what bindings check (as walk_ancestry reads it):
        # create_time, name and parent. (/proc/<pid>/exe is withheld; psutil's exe() then
        # guesses from cmdline[0], which the process chose: bindings must not trust that.)
        probe = (
            "import os, psutil\n"
            "p = psutil.Process(int(sys.argv[1]))\n"
            "try:\n    os.readlink(f'/proc/{p.pid}/exe')\n    exe = 'readable'\n"
            "except PermissionError:\n    exe = None\n"
            "print(json.dumps([p.create_time() > 0, p.name(), p.ppid(), exe]))\n"
        )
        created, name, ppid, exe = _probe_as_user(other_uid, probe, proc.pid, timeout=30)
        assert created and name and ppid == os.getpid() and exe is None


def test_a_non_dumpable_process_cannot_pass_for_another_executable_through_its_argv0(
    other_uid: tuple[pwd.struct_passwd, str, Path],
) -> None:
    # The attack: a same-uid process makes itself non-dumpable (so a non-root broker cannot
    # read /proc/<pid>/exe) and sets argv[0] to the client it wants to pass for. psutil's
    # exe() then falls back to argv[0]; the ancestry walk must report no executable instead.
    _, interp, _ = other_uid
    spoof = "import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); time.sleep(30)"
    attacker = subprocess.Popen(  # 4: PR_SET_DUMPABLE; argv[0] names another file
        ["/usr/bin/env", "-I", "-c", spoof],
        executable=interp,
        env={"PATH": "/usr/bin:/bin"},
        **_user_kw(other_uid),  # type: ignore[arg-type]
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until it is non-dumpable (its /proc is root's)
            if os.stat(f"/proc/{attacker.pid}/environ").st_uid == 0:
                break
            time.sleep(0.05)
        probe = (
            "import psutil\n"
            "from broker.core.bindings import walk_ancestry\n"
            "pid = int(sys.argv[1])\n"
            "print(json.dumps([psutil.Process(pid).exe(), walk_ancestry(pid)[0].exe]))\n"
        )
        psutil_guess, walked = _probe_as_user(other_uid, probe, attacker.pid, timeout=60)
        assert psutil_guess == "/usr/bin/env"  # the spoof works on psutil alone
        assert walked == ""  # the walk trusts only the kernel's link: no executable to match
    finally:
        attacker.kill()
        attacker.wait(timeout=10)
