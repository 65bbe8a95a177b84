"""git and Docker credential helpers, driven by real `git` and the real helper executables."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import CAPTURED, STDERRS, Apm, Broker, clean_env, register_secret

pytestmark = pytest.mark.slow

BIN = str(Path(sys.executable).parent)
GH_PW = "gh-pat-s3cret-1"
ORG_PW = "org-s3cret-22"
ROOT_PW = "root-s3cret-333"


def _seed(apm: Apm) -> None:
    for name, url, user, pw in (
        ("github", "https://github.com", "alice", GH_PW),
        ("gl-org", "https://gitlab.example.com/org", "bob", ORG_PW),
        ("gl-root", "https://gitlab.example.com", "carol", ROOT_PW),
    ):
        apm.ok(
            "add", "login", name, "--url", url, "--field", f"username={user}", "--from-stdin",
            stdin=pw + "\n",
        )  # fmt: skip


def _token(apm: Apm, *args: str) -> str:
    token: str = json.loads(apm.ok("delegate", "--json", *args).stdout)["token"]
    return token


def _git_env(home: Path, token: str) -> dict[str, str]:
    cfg = home / "gitconfig"
    cfg.write_text("[credential]\n\thelper = apm\n")
    return clean_env(
        home,
        APM_EPHEMERAL_ID=token,
        PATH=f"{BIN}:{os.environ['PATH']}",
        GIT_CONFIG_GLOBAL=str(cfg),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/false",
        HOME=str(home),
    )


def _run(argv: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    CAPTURED.extend([proc.stdout, proc.stderr])
    STDERRS.append(proc.stderr)
    return proc


def _fill(env: dict[str, str], *lines: str, config: tuple[str, ...] = ()) -> dict[str, str]:
    argv = ["git", *config, "credential", "fill"]
    proc = _run(argv, env, "\n".join(lines) + "\n\n")
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def test_git_credential_fill_answers_from_the_login_matching_protocol_host_and_path(
    vault: Broker, apm: Apm, home: Path
) -> None:
    _seed(apm)
    env = _git_env(home, _token(apm, "--scope", "secrets"))
    got = _fill(env, "protocol=https", "host=github.com")
    assert (got["username"], got["password"]) == ("alice", GH_PW)
    path = ("-c", "credential.useHttpPath=true")
    got = _fill(env, "protocol=https", "host=gitlab.example.com", "path=org/repo.git", config=path)
    assert (got["username"], got["password"]) == ("bob", ORG_PW)
    got = _fill(env, "protocol=https", "host=gitlab.example.com", "path=other/x.git", config=path)
    assert (got["username"], got["password"]) == ("carol", ROOT_PW)
    # another protocol or host is not answered: git would prompt (and may not here)
    proc = _run(["git", "credential", "fill"], env, "protocol=http\nhost=github.com\n\n")
    assert proc.returncode != 0
    assert GH_PW not in proc.stdout
    proc = _run(["git", "credential", "fill"], env, "protocol=https\nhost=evil.example\n\n")
    assert proc.returncode != 0


def test_git_helper_respects_the_sessions_filter_and_scope(
    vault: Broker, apm: Apm, home: Path
) -> None:
    _seed(apm)
    apm.ok("space", "add", "work")
    filtered = _git_env(home, _token(apm, "--scope", "secrets", "--space", "work"))
    proc = _run(["git", "credential", "fill"], filtered, "protocol=https\nhost=github.com\n\n")
    assert proc.returncode != 0
    assert GH_PW not in proc.stdout + proc.stderr
    read_only = _git_env(home, _token(apm, "--scope", "read"))
    proc = _run(["git", "credential", "fill"], read_only, "protocol=https\nhost=github.com\n\n")
    assert proc.returncode != 0
    assert "scope 'read'" in proc.stderr  # PERMISSION_DENIED from the broker
    assert GH_PW not in proc.stdout + proc.stderr


def test_git_approve_stores_a_login_and_reject_erases_only_the_rejected_password(
    vault: Broker, apm: Apm, home: Path
) -> None:
    env = _git_env(home, _token(apm, "--scope", "write"))
    new_pw = "stored-by-git-444"
    register_secret(new_pw)
    creds = f"protocol=https\nhost=git.example.org\nusername=dave\npassword={new_pw}\n\n"
    proc = _run(["git", "credential", "approve"], env, creds)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(apm.ok("show", "git:git.example.org", "--json").stdout)
    assert shown["url"] == "https://git.example.org"
    assert shown["tags"] == ["git-credential"]
    assert apm.ok("get", "git:git.example.org").stdout == new_pw + "\n"
    got = _fill(env, "protocol=https", "host=git.example.org")
    assert got["password"] == new_pw
    # a reject for some other password leaves the entry alone
    stale = creds.replace(new_pw, "not-the-stored-one")
    assert _run(["git", "credential", "reject"], env, stale).returncode == 0
    apm.ok("show", "git:git.example.org")
    assert _run(["git", "credential", "reject"], env, creds).returncode == 0
    assert (
        apm("show", "git:git.example.org", password="correct horse battery staple").returncode == 6
    )
    # a login the person made is never erased by git
    _seed(apm)
    gh = f"protocol=https\nhost=github.com\nusername=alice\npassword={GH_PW}\n\n"
    assert _run(["git", "credential", "reject"], env, gh).returncode == 0
    apm.ok("show", "github")


class _AuthHandler(SimpleHTTPRequestHandler):
    expected = ""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    src = tmp_path / "src"
    src.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C"]
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    (src / "README").write_text("hello from the server\n")
    subprocess.run([*git, str(src), "add", "README"], check=True)
    subprocess.run([*git, str(src), "commit", "-qm", "init"], check=True)
    served = tmp_path / "www"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(served / "repo.git")], check=True)
    subprocess.run(["git", "-C", str(served / "repo.git"), "update-server-info"], check=True)
    handler = type("H", (_AuthHandler,), {})
    handler.expected = "Basic " + base64.b64encode(f"alice:{GH_PW}".encode()).decode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/repo.git", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_git_clone_over_http_basic_auth_gets_its_password_from_apm(
    vault: Broker, apm: Apm, home: Path, git_server: tuple[str, Path]
) -> None:
    url, tmp = git_server
    apm.ok(
        "add", "login", "local-git", "--url", url.rsplit("/", 1)[0], "--field", "username=alice",
        "--from-stdin", stdin=GH_PW + "\n",
    )  # fmt: skip
    env = _git_env(home, _token(apm, "--scope", "secrets"))
    proc = _run(["git", "clone", "-q", url, str(tmp / "clone")], env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "clone" / "README").read_text() == "hello from the server\n"
    assert GH_PW not in (tmp / "clone" / ".git" / "config").read_text()


def _docker(env: dict[str, str], action: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-credential-apm", path=BIN)
    assert exe is not None
    return _run([exe, action], env, stdin)


def test_docker_credential_helper_store_get_list_erase(vault: Broker, apm: Apm, home: Path) -> None:
    env = clean_env(home, APM_EPHEMERAL_ID=_token(apm, "--scope", "write"))
    secret = "dckr_pat_s3cret-555"
    register_secret(secret)
    server = "https://registry.example.com"
    doc = {"ServerURL": server, "Username": "erin", "Secret": secret}
    stored = _docker(env, "store", json.dumps(doc))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert stored.stdout == ""
    got = _docker(env, "get", server + "\n")
    assert got.returncode == 0, got.stdout
    assert json.loads(got.stdout) == doc
    # Docker also asks by bare host name
    assert json.loads(_docker(env, "get", "registry.example.com").stdout)["Secret"] == secret
    _seed(apm)  # logins made by the person are not listed
    listed = _docker(env, "list")
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == {server: "erin"}
    assert secret not in listed.stdout
    assert _docker(env, "erase", server).returncode == 0
    missing = _docker(env, "get", server)
    assert missing.returncode == 1
    assert missing.stdout == "credentials not found in native keychain\n"
    assert _docker(env, "erase", server).returncode == 1


def test_docker_credential_helper_refuses_bad_input_without_a_traceback(
    vault: Broker, apm: Apm, home: Path
) -> None:
    env = clean_env(home, APM_EPHEMERAL_ID=_token(apm, "--scope", "write"))
    for action, data in (("store", "{not json"), ("store", '{"ServerURL": 1}'), ("bogus", "")):
        proc = _docker(env, action, data)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stdout + proc.stderr
        assert proc.stdout.startswith("apm: ")
    read_only = clean_env(home, APM_EPHEMERAL_ID=_token(apm, "--scope", "read"))
    _seed(apm)
    denied = _docker(read_only, "get", "https://github.com")
    assert denied.returncode == 1
    assert GH_PW not in denied.stdout + denied.stderr
    assert "scope 'read'" in denied.stdout
    version = _docker(env, "version")
    assert version.returncode == 0 and version.stdout.startswith("docker-credential-apm ")
