"""`apm credential get|store|erase` (and `git-credential-apm`): git's credential-helper protocol.

`git config --global credential.helper apm` makes git run `git-credential-apm ACTION` with
`key=value` lines on stdin (protocol, host, path, username, password, url). `get` answers with
the username and password of the best matching login entry, or nothing (git then asks the
person). `store` adds or updates a login tagged `git-credential`; `erase` removes only such an
entry, and only while it still holds the rejected password.

Rules:
- The session in APM_EPHEMERAL_ID is used when set; otherwise the master password is asked on
  the terminal (stdin carries git's protocol, so never --password-stdin).
- The password goes to stdout in git's format and nowhere else.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, TYPE_CHECKING

from broker.wire.errors import InvalidParameters

if TYPE_CHECKING:
    from .credential_store import Target

TAG = "git-credential"
MAX_INPUT = 64 * 1024


def read_request(stream: IO[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    total = 0
    for line in stream:
        total += len(line)
        if total > MAX_INPUT:
            raise InvalidParameters("credential request too large")
        line = line.rstrip("\n")
        if not line:
            break
        key, sep, value = line.partition("=")
        if not sep:
            raise InvalidParameters("credential request lines look like key=value")
        if key.endswith("[]"):  # multi-valued attributes (capability[], wwwauth[])
            continue
        out[key] = value
    return out


def target_of(req: dict[str, str]) -> Target:
    from .credential_store import Target

    if req.get("url") and not req.get("host"):
        t = Target.from_url(req["url"])
        if t is None:
            raise InvalidParameters("credential request has a url without a host")
        return t
    if not req.get("host"):
        raise InvalidParameters("credential request names no host")
    return Target(req.get("protocol") or None, req["host"].lower(), req.get("path", "").strip("/"))


def _safe(value: str, what: str) -> str:
    if "\n" in value or "\0" in value:
        raise InvalidParameters(f"the stored {what} cannot be passed to git (it has a newline)")
    return value


def cmd_credential(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from .auth import Credentials
    from .client import BrokerClient
    from .credential_store import LoginStore, space_from_env, username_of

    req = read_request(sys.stdin)
    want = target_of(req)
    who = Credentials(args)
    with BrokerClient() as c:
        store = LoginStore(c, who.creds(), args.space or space_from_env())
        if args.action == "get":
            found = store.find(want, req.get("username") or None)
            if not found:
                return 0
            entry = found[0]
            username = username_of(entry) or req.get("username") or ""
            password = store.password(entry).get_secret_value()
            sys.stdout.write(
                f"username={_safe(username, 'username')}\npassword={_safe(password, 'password')}\n"
            )
            sys.stdout.flush()
            return 0
        if args.action == "store":
            if not req.get("username") or not req.get("password"):
                return 0  # nothing to keep (git sends store only after a success)
            store.store(want, req["username"], SecretStr(req["password"]), TAG, "git:")
            return 0
        rejected = SecretStr(req["password"]) if req.get("password") else None
        store.erase(want, req.get("username") or None, rejected, TAG)
        return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "credential",
        help="git credential helper (git config credential.helper apm)",
        description="Speak git's credential-helper protocol on stdin/stdout, answering from "
        "login entries matched by protocol, host and path. Set it up with "
        '"git config --global credential.helper apm" (git runs git-credential-apm). Uses '
        "APM_EPHEMERAL_ID, or asks for the master password on the terminal.",
    )
    p.add_argument(
        "action", choices=("get", "store", "erase"), help="what git asks for (git's protocol)"
    )
    p.add_argument(
        "--space", help="only logins in this space (default: all; env APM_CREDENTIAL_SPACE)"
    )
    p.set_defaults(func=cmd_credential, password_stdin=False)
