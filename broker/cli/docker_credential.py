"""`docker-credential-apm get|store|erase|list|version`: Docker's credential-helper protocol.

Set `"credsStore": "apm"` in ~/.docker/config.json. Docker writes the server URL (get,
erase) or a JSON object {ServerURL, Username, Secret} (store) on stdin and reads JSON or an
error message from stdout; a missing credential is the exact message Docker checks for.

Rules:
- Same auth as the git helper: APM_EPHEMERAL_ID, else the master password on the terminal.
- `list` shows only logins this helper stored (tag `docker-credential`): registry URL and
  username, never a secret. `get` answers from any matching login.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import SecretStr

from broker import __version__
from broker.wire.errors import ApmError, InvalidParameters

from .auth import Credentials
from .client import BrokerClient
from .credential_store import LoginStore, Target, space_from_env, username_of

TAG = "docker-credential"
NOT_FOUND = "credentials not found in native keychain"
MAX_INPUT = 64 * 1024


class NotFound(Exception):
    pass


def _target(server: str) -> Target:
    t = Target.from_url(server.strip())
    if t is None:
        raise InvalidParameters("no server URL on stdin")
    return t


def run(action: str, data: str) -> str:
    """Perform one action on stdin's text; return stdout's text."""
    who = Credentials(argparse.Namespace(password_stdin=False))
    with BrokerClient(client_name="docker-credential-apm") as c:
        store = LoginStore(c, who.creds(), space_from_env())
        if action == "get":
            server = data.strip()
            found = store.find(_target(server))
            if not found:
                raise NotFound()
            e = found[0]
            secret = store.password(e).get_secret_value()
            out = {"ServerURL": server, "Username": username_of(e) or "", "Secret": secret}
            return json.dumps(out) + "\n"
        if action == "store":
            try:
                doc = json.loads(data)
                server, user, secret = doc["ServerURL"], doc["Username"], doc["Secret"]
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidParameters(
                    "store expects JSON with ServerURL, Username and Secret"
                ) from exc
            if not all(isinstance(v, str) for v in (server, user, secret)) or not secret:
                raise InvalidParameters("ServerURL, Username and Secret must be strings")
            store.store(_target(server), user, SecretStr(secret), TAG, "docker:")
            return ""
        if action == "erase":
            if not store.erase(_target(data), None, None, TAG):
                raise NotFound()
            return ""
        if action == "list":
            listing = {e.url: username_of(e) or "" for e in store.logins(tag=TAG) if e.url}
            return json.dumps(listing) + "\n"
    raise InvalidParameters(f"unknown action (expected get, store, erase, list): {action[:20]}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stdout.write("usage: docker-credential-apm get|store|erase|list|version\n")
        return 1
    if args[0] == "version":
        sys.stdout.write(f"docker-credential-apm {__version__}\n")
        return 0
    data = "" if args[0] == "list" else sys.stdin.read(MAX_INPUT + 1)
    try:
        if len(data) > MAX_INPUT:
            raise InvalidParameters("input too large")
        sys.stdout.write(run(args[0], data))
        return 0
    except NotFound:
        sys.stdout.write(NOT_FOUND + "\n")
        return 1
    except ApmError as exc:
        sys.stdout.write(f"apm: {exc.message}\n")  # Docker shows stdout as the error
        if exc.hint:
            sys.stderr.write(f"apm: hint: {exc.hint}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
