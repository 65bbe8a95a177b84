"""The lean path of the one-shot commands a script or agent runs often: `apm get`, `apm totp`,
`apm run` with a session in APM_EPHEMERAL_ID.

They start in a fraction of the full CLI's time: the parser knows only the one command, requests
are plain dicts (the frames `broker.wire.protocol` models would encode), and no pydantic or other
command module is imported (`run_cmd` is itself lean, and `raw_calls` holds the calls both
make). Without a session (the owner's password), `main` takes the full path.

Rules:
- Same contract as the full path: the same wire frames, client-side checks with the same
  messages, the same error codes, hints and exit codes (tests/test_cli_oneshot.py compares them).
- Nothing here imports pydantic, `broker.wire.protocol`/`entries`, or another command module but
  run_cmd (itself lean); tests/test_cli_oneshot.py probes sys.modules.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from broker.wire.limits import FIELD_NAME_PATTERN, NAME_MAX, SPACE_PATTERN

from .auth import AGENT_ENV, session_token
from .client import BrokerClient
from .raw_calls import invalid, result_field

HOT = ("get", "totp", "run")


def _password_stdin(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )


def get_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="entry name or id")
    p.add_argument("--space", help="the space the entry is in (needed if the name is in several)")
    p.add_argument("--field", help="field to print (default: the type's main secret)")
    p.add_argument("-n", "--no-newline", action="store_true", help="no trailing newline")
    p.add_argument("--clip", action="store_true", help="copy to the clipboard instead of printing")
    p.add_argument(
        "--clear-after",
        type=int,
        default=20,
        metavar="S",
        help="with --clip: clear it after S seconds if it still holds the value (default 20)",
    )
    _password_stdin(p)


def totp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="entry name or id")
    p.add_argument("--space", help="the space the entry is in (needed if the name is in several)")
    _password_stdin(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


GET_HELP = "print one secret value to stdout"
TOTP_HELP = "print the current TOTP code of an entry"


def _register(sub: argparse._SubParsersAction[argparse.ArgumentParser], command: str) -> None:
    if command == "get":
        get_arguments(sub.add_parser("get", help=GET_HELP))
    elif command == "totp":
        totp_arguments(sub.add_parser("totp", help=TOTP_HELP))
    else:
        from . import run_cmd

        run_cmd.register(sub)


def entry_ref(name: str, space: str | None, **extra: str | None) -> dict[str, Any]:
    """EntryRef / EntryGetParams as a dict, checked as their models check them."""
    bad = []
    if not 1 <= len(name) <= NAME_MAX:
        bad.append("ref")
    if space is not None and not re.fullmatch(SPACE_PATTERN, space):
        bad.append("space")
    for key, value in extra.items():
        if value is not None and not re.fullmatch(FIELD_NAME_PATTERN, value):
            bad.append(key)
    if bad:
        raise invalid(bad)
    params: dict[str, Any] = {"ref": name}
    if space is not None:
        params["space"] = space
    params.update({k: v for k, v in extra.items() if v is not None})
    return params


def _session(args: argparse.Namespace) -> dict[str, Any]:
    return {"token": session_token(args), "agent": os.environ.get(AGENT_ENV) or None}


def cmd_get(args: argparse.Namespace) -> int:
    params = entry_ref(args.name, args.space, field=args.field)
    with BrokerClient() as c:
        res = c.call_raw("entry.get", params, **_session(args))
    value: str = result_field(res, "value", str)
    sys.stdout.write(value + ("" if args.no_newline else "\n"))
    sys.stdout.flush()
    return 0


TOTP_KEYS = (("id", str), ("name", str), ("code", str), ("remaining", int), ("period", int))


def cmd_totp(args: argparse.Namespace) -> int:
    params = entry_ref(args.name, args.space)
    with BrokerClient() as c:
        res = c.call_raw("entry.totp", params, **_session(args))
    totp = {key: result_field(res, key, kind) for key, kind in TOTP_KEYS}
    if args.json:
        import json

        sys.stdout.write(json.dumps(totp, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(totp["code"] + "\n")
        sys.stderr.write(f"apm: valid for {totp['remaining']} more seconds\n")
    return 0


def parse(argv: list[str]) -> argparse.Namespace | None:
    """The hot command's arguments, or None when the full CLI must handle it (no session,
    the owner path asked for with --password-stdin, or `get --clip`)."""
    if not argv or argv[0] not in HOT or session_token() is None:
        return None
    from .parser import Parser

    parser = Parser(prog="apm")
    # typed as argparse's own: every command's register() takes that (subparsers are Parsers)
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(  # type: ignore[assignment]
        dest="command", required=True, metavar="COMMAND"
    )
    _register(sub, argv[0])
    args = parser.parse_args(argv)
    if getattr(args, "password_stdin", False) or getattr(args, "clip", False):
        return None
    if argv[0] != "run":
        args.func = cmd_get if argv[0] == "get" else cmd_totp
    return args
