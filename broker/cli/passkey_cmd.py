"""`apm passkey add|ls`, and opening the approval page for `--passkey` decisions: the person
proves presence with a passkey in the browser instead of typing the master password here.

Rules:
- Registering needs the master password once (`passkey.begin` is an owner operation); the page
  it opens registers the credential, which the broker keeps sealed in the vault.
- The page link is printed and opened in the browser; it is not a secret (deciding on the page
  needs the passkey), but it is only useful on this machine (loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import webbrowser

from broker.wire.errors import RequestClosed, TransactionClosed
from broker.wire.protocol import ApprovalLinkParams, Empty, PasskeyRemoveParams

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info

WAIT_SECONDS = 300.0


def _open(url: str, args: argparse.Namespace) -> None:
    sys.stderr.write(f"apm: open this page on this machine: {url}\n")
    if not getattr(args, "no_browser", False):
        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url)


def decide_on_page(c: BrokerClient, kind: str, item: str, args: argparse.Namespace) -> int:
    """Open the item's page and wait until it is decided there (or the wait ends)."""
    link = c.call("approval.link", ApprovalLinkParams(kind=kind, id=item))
    if link.url is None:
        closed = TransactionClosed if kind == "tx" else RequestClosed
        raise closed(
            f"{item} is {link.state}; there is nothing to decide on the page",
            hint="apm tx ls / apm request ls show what is pending",
        )
    _open(link.url, args)
    deadline = time.monotonic() + float(getattr(args, "wait", WAIT_SECONDS))
    while time.monotonic() < deadline:
        link = c.call("approval.link", ApprovalLinkParams(kind=kind, id=item))
        if link.url is None:
            info(f"{item}: {link.state}")
            return 0 if link.state in ("approved", "committed") else 1
        time.sleep(0.5)
    info(f"{item}: still {link.state}; the page stays open until it expires")
    return 1


def cmd_passkey(args: argparse.Namespace) -> int:
    with BrokerClient() as c:
        if args.pk_cmd == "ls":
            res = c.call("passkey.list", Empty())
            if args.json:
                emit_json(res.passkeys)
            elif not res.passkeys:
                info("no passkeys registered; approvals on the page ask for the master password")
            for p in [] if args.json else res.passkeys:
                sys.stdout.write(f"{p.id}…  {p.label}  added {p.created_at}\n")
            return 0
        if args.pk_cmd == "rm":
            owner = Credentials(args, owner_only=True)
            left = c.call("passkey.remove", PasskeyRemoveParams(id=args.id), **owner.creds())
            info(
                f"passkey removed; {len(left.passkeys)} left"
                + ("" if left.passkeys else ": approvals on the page ask for the master password")
            )
            return 0
        before = len(c.call("passkey.list", Empty()).passkeys)
        owner = Credentials(args, owner_only=True)
        res = c.call("passkey.begin", Empty(), **owner.creds())
        _open(res.url, args)
        deadline = time.monotonic() + float(args.wait)
        while time.monotonic() < deadline:
            if len(c.call("passkey.list", Empty()).passkeys) > before:
                info("passkey registered: approvals on the page now need it")
                return 0
            time.sleep(0.5)
    info("no passkey was registered before the wait ended")
    return 1


def add_page_options(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--passkey",
        action="store_true",
        help="decide on the approval page with your passkey instead of typing the password",
    )
    q.add_argument("--no-browser", action="store_true", help="print the page link only")
    q.add_argument(
        "--wait", type=float, default=WAIT_SECONDS, help="seconds to wait for the page's decision"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("passkey", help="register a passkey for approving on the page")
    psub = p.add_subparsers(dest="pk_cmd", required=True, metavar="COMMAND")
    add = psub.add_parser("add", help="open the page to register a passkey (master password)")
    add.add_argument("--no-browser", action="store_true", help="print the page link only")
    add.add_argument("--wait", type=float, default=WAIT_SECONDS, help="seconds to wait")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    add.set_defaults(func=cmd_passkey)
    rm = psub.add_parser("rm", help="remove a registered passkey (master password)")
    rm.add_argument(
        "id",
        help='the passkey\'s id as "apm passkey ls" shows it; '
        'an id that starts with "-" goes after "--": apm passkey rm -- -AbC',
    )
    rm.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    rm.set_defaults(func=cmd_passkey)
    ls = psub.add_parser("ls", help="registered passkeys")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_passkey)
