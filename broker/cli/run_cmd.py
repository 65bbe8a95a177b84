"""`apm run [--env NAME=apm://...]... [--env-file FILE] -- COMMAND ARGS...`

Resolves `apm://<space>/<entry>/<field>` references through the broker (with the session in
APM_EPHEMERAL_ID and its grants and scopes, or the master password), starts COMMAND with those
variables set, forwards signals, masks every occurrence of a resolved value in the child's
stdout and stderr with `<concealed by apm>`, and exits with the child's code.

Rules:
- Values go into the child's environment only: never argv, never a file.
- The child does not inherit APM_EPHEMERAL_ID: it gets the secrets it was given, not the session.
  Nor can it read it from `/proc/$PPID/environ`: before anything is resolved, `apm run` makes
  itself non-dumpable and overwrites the token in its initial environment block (#13.9).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from broker import exposure
from broker.wire.errors import InvalidParameters

from .auth import AGENT_ENV, TOKEN_ENV, Credentials
from .masking import Masker
from .raw_calls import resolve_refs  # lean: `apm run` starts without pydantic

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


def _split(spec: str, where: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
        raise InvalidParameters(f"{where}: expected NAME=VALUE", data={"arg": name[:64]})
    return name, value


def read_env_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidParameters(f"cannot read {path}: {exc.strerror}") from exc
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        name, value = _split(line, f"{path}:{n}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out.append((name, value))
    return out


def _pump(src: IO[bytes], dst: IO[bytes], masker: Masker) -> None:
    while True:
        chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
        if not chunk:
            break
        data = masker.feed(chunk)
        if data:
            dst.write(data)
            dst.flush()
    tail = masker.flush()
    if tail:
        dst.write(tail)
        dst.flush()


def cmd_run(args: argparse.Namespace) -> int:
    exposure.make_non_dumpable()
    who = Credentials(args)  # takes the token from the environment ...
    exposure.scrub_environ(TOKEN_ENV)  # ... which then no longer holds it, even in /proc
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InvalidParameters("no command to run", hint="apm run --env NAME=apm://... -- CMD")
    pairs: list[tuple[str, str]] = []
    for path in args.env_file or []:
        pairs += read_env_file(Path(path))
    pairs += [_split(spec, "--env") for spec in args.env or []]
    refs = sorted({v for _, v in pairs if v.startswith("apm://")})
    values: dict[str, str] = {}
    if refs:
        values = resolve_refs(refs, who)
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, AGENT_ENV)}
    for name, value in pairs:
        env[name] = values.get(value, value)
    masker_secrets = [v.encode() for v in values.values()]
    try:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise InvalidParameters(f"cannot run {command[0]!r}: {exc.strerror}") from exc
    previous = {s: signal.signal(s, lambda sig, _f: proc.send_signal(sig)) for s in FORWARDED}
    threads = [
        threading.Thread(
            target=_pump, args=(proc.stdout, sys.stdout.buffer, Masker(masker_secrets))
        ),
        threading.Thread(
            target=_pump, args=(proc.stderr, sys.stderr.buffer, Masker(masker_secrets))
        ),
    ]
    for t in threads:
        t.start()
    try:
        code = proc.wait()
    finally:
        for t in threads:
            t.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command with secrets in its environment, masked in its output",
        description="Resolve apm://<space>/<entry>/<field> references (with APM_EPHEMERAL_ID "
        "and its grants, or the master password), run COMMAND with them in its environment, "
        "replace every occurrence of a value in its output with <concealed by apm>, and exit "
        "with its exit code.",
    )
    p.add_argument(
        "--env",
        action="append",
        metavar="NAME=apm://SPACE/ENTRY/FIELD",
        help="set NAME in the child's environment to this secret (repeatable)",
    )
    p.add_argument(
        "--env-file",
        action="append",
        metavar="FILE",
        help="lines of NAME=VALUE; apm:// values are resolved",
    )
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=cmd_run)
