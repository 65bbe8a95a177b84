"""`apm tx ls|approve|deny`: the person decides on writes of sessions with `--approve owner`."""

from __future__ import annotations

import argparse

from broker.wire.display import args_lines, escape
from broker.wire.protocol import TxDecideParams, TxListParams

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info, write_lines
from .passkey_cmd import add_page_options, decide_on_page


def cmd_tx(args: argparse.Namespace) -> int:
    if getattr(args, "passkey", False) and args.tx_cmd == "approve":
        with BrokerClient() as c:
            return decide_on_page(c, "tx", args.tx_id, args)
    owner = Credentials(args, owner_only=True)
    with BrokerClient() as c:
        if args.tx_cmd == "ls":
            res = c.call("tx.list", TxListParams(pending=args.pending), **owner.creds())
            if args.json:
                emit_json(res.transactions)
                return 0
            if not res.transactions:
                info("no transactions")
            for t in res.transactions:
                # the preview (the agent's view, values escaped by the broker), then what
                # approving really executes: the stored arguments, secrets as length + fp
                write_lines(
                    [
                        f"{t.tx_id}  {t.status:<15} {t.tool:<18} session {t.session} "
                        f"({escape(t.label or '-')}), expires {t.expires_at.astimezone():%H:%M:%S}",
                        *(f"    {line}" for line in t.preview.splitlines()),
                        f"    approving runs {escape(t.method or t.tool)} with exactly:",
                        *args_lines(t.args, "      "),
                        *([f"    page (this machine): {t.page_url}"] if t.page_url else []),
                    ]
                )
            return 0
        method = "tx.approve" if args.tx_cmd == "approve" else "tx.deny"
        res = c.call(method, TxDecideParams(tx_id=args.tx_id, reason=args.reason), **owner.creds())
    if args.json:
        emit_json(res)
    else:
        if res.status == "committed":  # a change held by the broker runs when approved
            info(f"{res.tx_id}: committed, receipt {res.receipt}")
        else:
            info(
                f"{res.tx_id}: {res.status}; the agent's next commit call "
                + ("executes it" if res.status == "approved" else "is refused")
            )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tx", help="list, approve or deny agents' pending writes")
    tsub = p.add_subparsers(dest="tx_cmd", required=True, metavar="COMMAND")
    ls = tsub.add_parser("ls", help="transactions with their previews")
    ls.add_argument("--pending", action="store_true", help="only those waiting for a decision")
    for name, text in (("approve", "approve a write (master password)"), ("deny", "deny a write")):
        d = tsub.add_parser(name, help=text)
        d.add_argument("tx_id", help="the transaction id (see apm tx ls)")
        d.add_argument("--reason", help="recorded and shown to the agent")
        d.add_argument("--json", action="store_true")
        d.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the master password from the first line of stdin",
        )
        if name == "approve":
            add_page_options(d)
        d.set_defaults(func=cmd_tx)
    ls.add_argument("--json", action="store_true")
    ls.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    ls.set_defaults(func=cmd_tx)
