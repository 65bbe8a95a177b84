"""After a full run, no secret value or master password is anywhere it should not be: not in
any file under APM_HOME (vault, backup, logs, broker output), not in any CLI output except the
stdout of `apm get`, and not in the broker's command line or environment.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .conftest import PASSWORD, Apm, Broker

pytestmark = pytest.mark.slow

NEW_PASSWORD = "second master KILO-2718-pw"
WRONG_PASSWORD = "wrong guess MIKE-4242-pw"
TOTP_SEED = base64.b32encode(b"HOTEL-totp-seed-4491").decode()

LOGIN_PW = "Gh-Pa55w0rd-ALPHA-91f3"
ROTATED_PW = "Gh-Rotated-JULIET-5150"
API_KEY = "sk-proj-BRAVO-4c2e8a9d7b"
TOKEN = "glpat-CHARLIE-77ab12cd"
NOTE_1 = "recovery code DELTA-5512"
NOTE_2 = "second line ECHO-8830"
# a real key (apm parses a key before saving it); its third line is key material, unique to it
SSH_KEY = (
    ed25519.Ed25519PrivateKey.generate()
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    .decode()
)
SSH_BODY = SSH_KEY.splitlines()[2]
DB_PW = "DbPass-GOLF-30c9e1"
PIN = "pin-INDIA-0042-x"
ARGV_SECRET = "argv-LIMA-6060-z"
REMOVED_SECRET = "gone-NOVEMBER-8080"

SECRETS = {
    "master password": PASSWORD,
    "new master password": NEW_PASSWORD,
    "wrong password": WRONG_PASSWORD,
    "totp seed": TOTP_SEED,
    "login password": LOGIN_PW,
    "rotated login password": ROTATED_PW,
    "api key": API_KEY,
    "token": TOKEN,
    "note line 1": NOTE_1,
    "note line 2": NOTE_2,
    "ssh key body": SSH_BODY,
    "database password": DB_PW,
    "custom pin": PIN,
    "secret refused on argv": ARGV_SECRET,
    "secret of a removed entry": REMOVED_SECRET,
}


def encodings(value: str) -> dict[str, bytes]:
    """The forms a leaked value could take: raw, hex, and base64 at every alignment."""
    raw = value.encode()
    out = {"utf-8": raw, "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}
    for k in range(3):
        chunk = raw[k:]
        chunk = chunk[: len(chunk) // 3 * 3]
        out[f"base64@{k}"] = base64.b64encode(chunk)
        out[f"base64url@{k}"] = base64.urlsafe_b64encode(chunk)
    return out


def find_leaks(blob: bytes, where: str) -> list[str]:
    return [
        f"{label} as {enc} in {where}"
        for label, value in SECRETS.items()
        for enc, needle in encodings(value).items()
        if needle in blob
    ]


@dataclass
class Recorder:
    """Runs apm and keeps every output that must be free of secrets."""

    apm: Apm
    outputs: list[tuple[str, str]] = field(default_factory=list)

    def __call__(
        self, *args: str, password: str | None = PASSWORD, stdin: str | None = None, rc: int = 0
    ) -> subprocess.CompletedProcess[str]:
        proc = self.apm(*args, password=password, stdin=stdin)
        assert proc.returncode == rc, f"apm {' '.join(args)} -> {proc.returncode}: {proc.stderr}"
        label = "apm " + " ".join(args)
        if args[0] != "get":  # `apm get` prints the value on purpose
            self.outputs.append((label + " (stdout)", proc.stdout))
        self.outputs.append((label + " (stderr)", proc.stderr))
        return proc


def test_no_secret_or_password_leaks_anywhere_after_a_full_run(
    vault: Broker, apm: Apm, home: Path
) -> None:
    run = Recorder(apm)
    run("add", "login", "github", "--field", "username=alice", "--from-stdin", stdin=LOGIN_PW)
    run("add", "api_key", "openai", "--field", "service=openai", "--from-stdin", stdin=API_KEY)
    run("add", "token", "gitlab", "--from-stdin", stdin=TOKEN + "\n")
    run("add", "note", "recovery", "--from-stdin", stdin=f"{NOTE_1}\n{NOTE_2}\n")
    run("add", "ssh_key", "deploy", "--from-stdin", stdin=SSH_KEY)
    run("add", "database", "prod-db", "--field", "host=db.local", "--from-stdin", stdin=DB_PW)
    run("add", "totp", "aws-mfa", "--from-stdin", stdin=TOTP_SEED + "\n")
    run("add", "custom", "misc", "--secret-field", "pin", "--from-stdin", stdin=PIN)
    run("add", "api_key", "temp", "--from-stdin", stdin=REMOVED_SECRET)
    run("add", "login", "argv", "--field", f"password={ARGV_SECRET}", rc=10)

    assert run("get", "github").stdout == LOGIN_PW + "\n"
    assert run("get", "recovery").stdout == f"{NOTE_1}\n{NOTE_2}\n"
    assert run("get", "misc", "--field", "pin").stdout == PIN + "\n"
    run("ls")
    run("ls", "--json")
    run("show", "github", "--json")
    run("show", "deploy")
    run("search", "git")
    run("totp", "aws-mfa")
    run("ls", password=WRONG_PASSWORD, rc=4)

    run("edit", "github", "--secret-field", "password", "--from-stdin", stdin=ROTATED_PW)
    assert run("get", "github").stdout == ROTATED_PW + "\n"
    run("passwd", "--password-stdin", password=None, stdin=f"{PASSWORD}\n{NEW_PASSWORD}\n")
    run("profile", "set", "standard", password=NEW_PASSWORD)
    run("profile", "show", "--json", password=NEW_PASSWORD)
    run("lock", password=None)
    run("unlock", password=NEW_PASSWORD)
    run("rm", "temp", password=NEW_PASSWORD)
    run("status", "--json", password=None)

    proc_files = {
        name: Path(f"/proc/{vault.pid}/{name}").read_bytes() for name in ("cmdline", "environ")
    }
    run("broker", "stop", password=None)
    assert vault.proc is not None and vault.proc.wait(timeout=15) == 0

    # a detached broker started by the CLI writes its own output file too
    try:
        run("unlock", password=NEW_PASSWORD)
        assert run("get", "gitlab", password=NEW_PASSWORD).stdout == TOKEN + "\n"
    finally:
        run("broker", "stop", password=None)

    files = sorted(p for p in home.rglob("*") if p.is_file() and not p.is_symlink())
    names = {p.relative_to(home).as_posix() for p in files}
    # the scan covers what it claims to cover
    assert {
        "vault.apm",
        "state/broker.log",
        "state/broker.out",
        "broker-stdout.log",
    } <= names

    leaks: list[str] = []
    for path in files:
        leaks += find_leaks(path.read_bytes(), str(path.relative_to(home)))
    for label, text in run.outputs:
        leaks += find_leaks(text.encode(), label)
    for name, blob in proc_files.items():
        leaks += find_leaks(blob, f"/proc/<broker>/{name}")
    assert leaks == []


def test_the_leak_scanner_finds_each_encoding() -> None:
    # guards against a scanner that can never fire
    for value in (API_KEY, NOTE_1, PASSWORD):
        for enc, needle in encodings(value).items():
            blob = b"prefix-" + needle + b"-suffix"
            assert find_leaks(blob, "x"), enc
    padded = base64.b64encode(b"xy" + API_KEY.encode() + b"z")
    assert find_leaks(padded, "misaligned base64")
    assert find_leaks(b"nothing to see", "clean") == []
