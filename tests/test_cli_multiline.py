"""Multi-line secrets (#14.3): an SSH key pasted at the prompt is stored whole, a broken key is
refused, and --from-file / --editor bring values in without leaving a copy behind.

The prompt tests drive the real `apm` in a pseudo-terminal, as a person pasting would.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .conftest import PASSWORD, PY, Apm, Broker, clean_env, register_secret

pytestmark = pytest.mark.slow


def rsa_key(bits: int = 3072) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    register_secret(pem.strip())
    return pem


class Pty:
    """The real `apm` on a pseudo-terminal: its /dev/tty is `master`'s other end."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execve(PY, [PY, "-m", "broker.cli.main", *argv], env)  # noqa: S606
            finally:
                os._exit(127)
        self.seen = b""

    def expect(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal; saw {self.seen[-400:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {text!r}: {self.seen[-400:]!r}")
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def send(self, data: str) -> None:
        raw = data.encode()
        while raw:
            n = os.write(self.fd, raw)
            raw = raw[n:]

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                with suppress(OSError):
                    self.seen += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"apm did not finish: {self.seen[-400:]!r}")


@contextmanager
def on_pty(home: Path, *argv: str) -> Iterator[Pty]:
    env = clean_env(home)
    env.pop("APM_EPHEMERAL_ID", None)
    p = Pty(list(argv), env)
    try:
        yield p
    finally:
        try:
            os.kill(p.pid, signal.SIGKILL)
            os.waitpid(p.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_pasted_30_line_key_is_stored_whole_and_not_echoed(
    vault: Broker, apm: Apm, home: Path
) -> None:
    key = rsa_key()
    assert len(key.splitlines()) >= 30
    with on_pty(home, "add", "ssh_key", "deploy") as t:
        t.expect("Master password:")
        t.send(PASSWORD + "\n")
        t.expect("Ctrl-D")
        t.send(key)  # pasted at once, ending in a newline
        t.send("\x04")  # Ctrl-D on the new line: end of input
        t.expect("Passphrase (empty to skip):")
        t.send("\n")
        assert t.wait() == 0, t.seen
        screen = t.seen.decode(errors="replace")
    assert f"read {len(key.splitlines())} lines for private_key" in screen
    for line in key.splitlines()[1:-1]:
        assert line not in screen  # hidden input: no echo of any line of the key
    assert apm.ok("get", "deploy").stdout == key


def test_a_key_cut_to_its_first_line_at_the_prompt_is_refused(
    vault: Broker, apm: Apm, home: Path
) -> None:
    key = rsa_key(2048)
    with on_pty(home, "add", "ssh_key", "cut") as t:
        t.expect("Master password:")
        t.send(PASSWORD + "\n")
        t.expect("Ctrl-D")
        t.send(key.splitlines()[0] + "\n\x04")
        t.expect("Passphrase (empty to skip):")
        t.send("\n")
        assert t.wait() == 10
        assert "not a valid SSH private key" in t.seen.decode()
    assert apm("get", "cut", password=PASSWORD).returncode == 6  # nothing was saved


def test_multiline_custom_field_and_note_read_until_eof(
    vault: Broker, apm: Apm, home: Path
) -> None:
    cert = "-----BEGIN CERTIFICATE-----\nMIIB0123\nabcdef==\n-----END CERTIFICATE-----"
    register_secret(cert)
    with on_pty(home, "add", "custom", "tls", "--multiline", "cert") as t:
        t.expect("Master password:")
        t.send(PASSWORD + "\n")
        t.expect("Ctrl-D")
        t.send(cert + "\n\x04")
        assert t.wait() == 0, t.seen
    assert apm.ok("get", "tls", "--field", "cert").stdout == cert + "\n"
    note = "line one of the note\n\n  indented line three\nlast"
    register_secret(note)
    with on_pty(home, "add", "note", "memo") as t:
        t.expect("Master password:")
        t.send(PASSWORD + "\n")
        t.expect("Content (multi-line")
        t.send(note + "\n\x04")
        assert t.wait() == 0, t.seen
    assert apm.ok("get", "memo").stdout == note + "\n"


def test_from_file_takes_a_whole_key_and_refuses_a_broken_one(
    vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    register_secret(key.decode().strip())
    good = tmp_path / "id_ed25519"
    good.write_bytes(key)
    apm.ok("add", "ssh_key", "ed", "--from-file", str(good))
    assert apm.ok("get", "ed").stdout == key.decode()
    lines = key.decode().splitlines()
    broken = tmp_path / "broken"
    broken.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # one line of the body lost
    proc = apm("add", "ssh_key", "bad", "--from-file", str(broken), password=PASSWORD)
    assert proc.returncode == 10
    assert "not a valid SSH private key" in proc.stderr and "--from-file" in proc.stderr
    proc = apm("add", "ssh_key", "bad2", "--from-stdin", password=PASSWORD, stdin="garbage\n")
    assert proc.returncode == 10
    assert apm("get", "bad", password=PASSWORD).returncode == 6
    # a passphrase-protected PEM key: its envelope is checked, its sealed part is the person's
    sealed = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"key passphrase 77"),
    )
    register_secret(sealed.decode().strip())
    (tmp_path / "sealed.pem").write_bytes(sealed)
    apm.ok("add", "ssh_key", "sealed", "--from-file", str(tmp_path / "sealed.pem"))
    assert apm.ok("get", "sealed").stdout == sealed.decode()
    proc = apm("add", "ssh_key", "x", "--from-file", str(tmp_path / "missing"), password=PASSWORD)
    assert proc.returncode == 10 and "cannot read" in proc.stderr
    proc = apm("add", "ssh_key", "y", "--from-file", str(good), "--from-stdin", password=PASSWORD)
    assert proc.returncode == 10


EDITOR = """#!{py}
import json, os, stat, sys
path = sys.argv[-1]
d = os.path.dirname(path)
with open(os.path.join(d, "." + os.path.basename(path) + ".swp"), "w") as f:
    f.write(os.environ["VALUE"])  # an editor's swap file holding the secret
with open(path, "a") as f:
    f.write(os.environ["VALUE"])
st, dst = os.stat(path), os.stat(d)
with open(os.environ["REPORT"], "w") as f:
    json.dump({{"path": path, "mode": stat.S_IMODE(st.st_mode),
               "dir_mode": stat.S_IMODE(dst.st_mode), "argv": sys.argv[1:]}}, f)
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def test_editor_file_is_private_and_gone_with_everything_beside_it(
    vault: Broker, apm: Apm, home: Path, tmp_path: Path
) -> None:
    editor = tmp_path / "ed"
    editor.write_text(EDITOR.format(py=sys.executable))
    editor.chmod(0o700)
    value = "note from the editor\nsecond line 7f3a\n"
    register_secret(value.strip())
    report = tmp_path / "report.json"
    env = clean_env(home, EDITOR=str(editor), VALUE=value, REPORT=str(report))
    env.pop("VISUAL", None)
    proc = apm("add", "note", "ed-note", "--editor", password=PASSWORD, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(report.read_text())
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    path = Path(seen["path"])
    assert not path.exists() and not path.parent.exists()  # swap file and all
    assert str(path.parent.parent) in {os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"}
    assert apm.ok("get", "ed-note").stdout == value  # one trailing newline dropped, get adds one

    proc = apm("add", "note", "ed-fail", "--editor", password=PASSWORD, env={**env, "EXIT": "3"})
    assert proc.returncode == 130
    assert not Path(json.loads(report.read_text())["path"]).parent.exists()
    assert apm("get", "ed-fail", password=PASSWORD).returncode == 6


def test_vim_gets_no_swap_file_and_no_history(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.cli.editor import editor_argv

    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", "/usr/bin/vim")
    assert editor_argv() == ["/usr/bin/vim", "-n", "-i", "NONE"]
    monkeypatch.setenv("EDITOR", "code --wait")
    assert editor_argv() == ["code", "--wait"]


def test_the_editor_directory_is_on_a_memory_file_system_when_there_is_one() -> None:
    from broker.cli.editor import _private_root

    root = _private_root()
    if root is not None:
        assert stat.S_ISDIR(os.stat(root).st_mode)
        assert root in {os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"}


def test_a_terminated_apm_still_removes_the_editor_directory(
    vault: Broker, apm: Apm, home: Path, tmp_path: Path
) -> None:
    editor = tmp_path / "ed"
    editor.write_text(
        EDITOR.format(py=sys.executable).replace(
            'sys.exit(int(os.environ.get("EXIT", "0")))', "import time; time.sleep(60)"
        )
    )
    editor.chmod(0o700)
    value = "half-written secret 51c2"
    register_secret(value)
    report = tmp_path / "report.json"
    env = clean_env(home, EDITOR=str(editor), VALUE=value, REPORT=str(report))
    env.pop("VISUAL", None)
    proc = subprocess.Popen(
        [PY, "-m", "broker.cli.main", "add", "note", "hup", "--editor", "--password-stdin"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(PASSWORD + "\n")
    proc.stdin.close()
    deadline = time.monotonic() + 30
    while not report.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the editor never started"
        time.sleep(0.05)
    path = Path(json.loads(report.read_text())["path"])
    assert path.exists()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.stderr is not None and proc.stdout is not None
    err = proc.stderr.read()
    proc.stderr.close()
    proc.stdout.close()
    assert proc.returncode == 130, err
    assert not path.parent.exists()
    assert apm("get", "hup", password=PASSWORD).returncode == 6
