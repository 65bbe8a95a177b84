"""`apm env scan` and `apm env migrate`: secrets leave .env files, `apm run` still sees them."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli.env_scan import classify, scan_text

from .conftest import PASSWORD, Apm, Broker, register_secret

VALUES = {
    "STRIPE_SECRET_KEY": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "GITHUB_TOKEN": "ghp_" + "16C7e42F292c6912E7710c838347Ae178B4a",
    "AWS_ACCESS_KEY_ID": "AKIA" + "IOSFODNN7EXAMPLE",
    "SLACK_BOT_TOKEN": "xoxb-" + "17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy",
    "GITLAB_TOKEN": "glpat-" + "xK9vB2mQ7rT4wY8zN3pL",
    "DB_PASSWORD": "p@ss word with spaces!",
    "SESSION_SIGNING": "Zq8#vT1!mR6xL0pW2sK9yB4n",
}
ENV_TEXT = f"""# app settings
DEBUG=true
PORT=8080
STRIPE_SECRET_KEY={VALUES["STRIPE_SECRET_KEY"]}
export GITHUB_TOKEN={VALUES["GITHUB_TOKEN"]}
AWS_ACCESS_KEY_ID={VALUES["AWS_ACCESS_KEY_ID"]}
SLACK_BOT_TOKEN='{VALUES["SLACK_BOT_TOKEN"]}'
GITLAB_TOKEN={VALUES["GITLAB_TOKEN"]}
DB_PASSWORD="{VALUES["DB_PASSWORD"]}"
SESSION_SIGNING={VALUES["SESSION_SIGNING"]}
API_URL=https://api.example.com/v1
PLACEHOLDER_TOKEN=changeme
"""
CHILD = (
    "import hashlib, json, os, sys\n"
    "keys = sys.argv[1:]\n"
    "print(json.dumps({k: hashlib.sha256(os.environ.get(k, '').encode()).hexdigest()"
    " for k in keys}))\n"
)


def _digests(values: dict[str, str]) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in values.items()}


def _run(apm: Apm, *args: str) -> subprocess.CompletedProcess[str]:
    # --password-stdin before the command: apm appends it last, inside the child's argv
    return apm("run", "--password-stdin", *args, stdin=PASSWORD + "\n", check=True)


def test_classify_knows_the_prefixes_and_leaves_plain_values_alone() -> None:
    kinds = {k: classify(k, v) for k, v in VALUES.items()}
    assert kinds["STRIPE_SECRET_KEY"] == "stripe-secret-key"
    assert kinds["GITHUB_TOKEN"] == "github-token"
    assert kinds["AWS_ACCESS_KEY_ID"] == "aws-access-key-id"
    assert kinds["SLACK_BOT_TOKEN"] == "slack-token"
    assert kinds["GITLAB_TOKEN"] == "gitlab-token"
    assert kinds["DB_PASSWORD"] == "secret-by-name"
    assert classify("X", "github_pat_" + "11ABCDEFG0123456789abcdefghijklmnop") == (
        "github-fine-grained-token"
    )
    assert classify("BLOB", "q7Zr4Lm9Xw2Tb8Vn5Ks1Jd6Hf3") == "high-entropy"
    assert classify("DATABASE_URL", "postgres://u:hunter2pass@db/x") == "url-with-password"
    for key, value in (
        ("DEBUG", "true"),
        ("PORT", "8080"),
        ("API_URL", "https://api.example.com/v1"),
        ("PLACEHOLDER_TOKEN", "changeme"),
        ("TOKEN", "apm://default/x/key"),
        ("NAME", "hello world"),
        ("PATH_DIR", "/usr/local/share/some/dir"),
    ):
        assert classify(key, value) is None, key


def test_scan_findings_carry_no_values() -> None:
    findings = scan_text(Path(".env"), ENV_TEXT)
    assert {f.key for f in findings} == set(VALUES)
    assert all(v not in repr(findings) for v in VALUES.values())


def test_apm_env_scan_lists_file_key_and_kind_but_never_a_value(apm: Apm, tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / ".env").write_text(ENV_TEXT)
    (tmp_path / "app" / "prod.env").write_text(f"GH={VALUES['GITHUB_TOKEN']}\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / ".env").write_text(f"GH={VALUES['GITHUB_TOKEN']}\n")
    (tmp_path / "notes.txt").write_text(f"GH={VALUES['GITHUB_TOKEN']}\n")
    out = apm("env", "scan", str(tmp_path), "--json", check=True)
    rows = json.loads(out.stdout)
    assert {(Path(r["file"]).name, r["key"]) for r in rows} == {
        *((".env", k) for k in VALUES),
        ("prod.env", "GH"),
    }
    text = apm("env", "scan", str(tmp_path), check=True)
    for v in VALUES.values():
        assert v not in text.stdout + text.stderr + out.stdout
    assert apm("env", "scan", str(tmp_path), "--check").returncode == 1
    assert apm("env", "scan", str(tmp_path / "nope")).returncode == 10


@pytest.mark.slow
def test_migrate_round_trip_apm_run_gives_the_child_the_original_values(
    vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    for v in VALUES.values():
        register_secret(v)
    env_file = tmp_path / "myapp" / ".env"
    env_file.parent.mkdir()
    env_file.write_text(ENV_TEXT)
    env_file.chmod(0o640)
    keys = [*VALUES, "DEBUG", "PORT"]
    expected = _digests({**VALUES, "DEBUG": "true", "PORT": "8080"})

    dry = apm.ok("env", "migrate", str(env_file), "--dry-run", "--space", "work")
    assert env_file.read_text() == ENV_TEXT
    assert "STRIPE_SECRET_KEY" in dry.stdout

    apm.ok("env", "migrate", str(env_file), "--space", "work")
    rewritten = env_file.read_text()
    for v in VALUES.values():
        assert v not in rewritten
    assert "STRIPE_SECRET_KEY=apm://work/myapp-STRIPE_SECRET_KEY/key" in rewritten
    assert "export GITHUB_TOKEN=apm://work/myapp-GITHUB_TOKEN/key" in rewritten
    assert "DEBUG=true\n" in rewritten and "# app settings\n" in rewritten
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    backup = env_file.with_name(".env.apm-backup")
    assert backup.read_text() == ENV_TEXT
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600

    ran = _run(apm, "--env-file", str(env_file), "--", sys.executable, "-c", CHILD, *keys)
    assert json.loads(ran.stdout) == expected

    # a second run finds nothing left to move
    again = apm.ok("env", "migrate", str(env_file), "--space", "work")
    assert "nothing to do" in again.stderr
    assert env_file.read_text() == rewritten

    # the same keys from another file of the same project are renamed, not overwritten
    other = tmp_path / "myapp" / "prod.env"
    other.write_text(f"GITHUB_TOKEN={VALUES['STRIPE_SECRET_KEY']}\n")
    apm.ok("env", "migrate", str(other), "--space", "work")
    assert '"apm://work/myapp-GITHUB_TOKEN (2)/key"' in other.read_text()
    ran = _run(apm, "--env-file", str(other), "--", sys.executable, "-c", CHILD, "GITHUB_TOKEN")
    assert json.loads(ran.stdout) == _digests({"GITHUB_TOKEN": VALUES["STRIPE_SECRET_KEY"]})
    ran = _run(apm, "--env-file", str(env_file), "--", sys.executable, "-c", CHILD, *keys)
    assert json.loads(ran.stdout) == expected


@pytest.mark.slow
def test_migrate_with_a_wrong_password_changes_nothing(
    vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_TEXT)
    bad = apm("env", "migrate", str(env_file), password="not-the-master-pw-1")
    assert bad.returncode == 4
    assert env_file.read_text() == ENV_TEXT
    assert not list(tmp_path.glob("*.apm-backup*"))


def test_migrate_refuses_a_symlink_and_a_missing_file_before_asking_anything(
    apm: Apm, tmp_path: Path
) -> None:
    real = tmp_path / "real.env"
    real.write_text(ENV_TEXT)
    link = tmp_path / ".env"
    link.symlink_to(real)
    got = apm("env", "migrate", str(link))
    assert got.returncode == 10 and "symbolic link" in got.stderr
    assert apm("env", "migrate", str(tmp_path / "none.env")).returncode == 10
    assert real.read_text() == ENV_TEXT and link.is_symlink()
