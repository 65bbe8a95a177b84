"""`apm request ls|approve|deny|revoke|watch`: the person's side of just-in-time access."""

from __future__ import annotations

import argparse
import sys
import time

from broker.wire.display import escape
from broker.wire.protocol import (
    AccessRequestInfo,
    RequestDecideParams,
    RequestListParams,
    RequestRefParams,
)

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info, write_lines
from .passkey_cmd import add_page_options, decide_on_page


def _show(r: AccessRequestInfo) -> None:
    what = escape(r.entry) + (f" (field {escape(r.field)})" if r.field else "")
    if r.totp_seed:
        what += " [the TOTP SEED itself, not only codes]"
    what += " [REVEAL: the value reaches the model]" if r.access == "reveal" else " [use only]"
    out = [
        f"{r.id}  {r.state:<8} {what} for {r.minutes} min — {escape(r.label or r.session)}",
        f"    why: {escape(r.justification)}",
    ]
    if r.state == "pending":
        out.append(f"    approve: {r.approve_command}    deny: apm request deny {r.id}")
        if r.page_url:
            out.append(f"    page (this machine): {r.page_url}")
    elif r.expires_at and r.state == "approved":
        out.append(f"    until {r.expires_at.astimezone():%H:%M:%S}")
    write_lines(out)


def cmd_request(args: argparse.Namespace) -> int:
    with BrokerClient() as c:
        if args.req_cmd in ("ls", "watch"):
            who = Credentials(args)
            pending = args.req_cmd == "watch" or args.pending
            res = c.call("request.list", RequestListParams(pending=pending), **who.creds())
            if args.req_cmd == "ls":
                if args.json:
                    emit_json(res.requests)
                elif not res.requests:
                    info("no access requests")
                for r in [] if args.json else res.requests:
                    _show(r)
                return 0
            seen: set[str] = set()
            info("watching for access requests (Ctrl-C to stop)")
            while True:
                for r in res.requests:
                    if r.id not in seen:
                        seen.add(r.id)
                        if args.json:
                            emit_json(r)
                        else:
                            _show(r)
                        sys.stdout.flush()
                time.sleep(args.interval)
                res = c.call("request.list", RequestListParams(pending=True), **who.creds())
        if args.req_cmd == "approve" and args.passkey:
            return decide_on_page(c, "request", args.request_id, args)
        if args.req_cmd == "approve":
            owner = Credentials(args, owner_only=True)
            params = RequestDecideParams(
                request_id=args.request_id,
                minutes=args.duration,
                reason=args.reason,
                use_only=args.use,
            )
            res = c.call("request.approve", params, **owner.creds())
        elif args.req_cmd == "deny":
            res = c.call(
                "request.deny", RequestDecideParams(request_id=args.request_id, reason=args.reason)
            )
        else:
            res = c.call("request.revoke", RequestRefParams(request_id=args.request_id))
    if args.json:
        emit_json(res)
    else:
        info(
            f"{res.id}: {res.state}"
            + (
                f" until {res.expires_at.astimezone():%H:%M:%S}"
                if res.state == "approved" and res.expires_at
                else ""
            )
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("request", help="list, approve, deny, revoke or watch access requests")
    rsub = p.add_subparsers(dest="req_cmd", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser, pw: bool = True) -> None:
        q.add_argument("--json", action="store_true")
        if pw:
            q.add_argument(
                "--password-stdin",
                action="store_true",
                help="read the master password from the first line of stdin",
            )
        q.set_defaults(func=cmd_request)

    ls = rsub.add_parser("ls", help="access requests (owner or an admin session)")
    ls.add_argument("--pending", action="store_true", help="only requests awaiting a decision")
    common(ls)
    ap = rsub.add_parser("approve", help="grant the access (master password)")
    ap.add_argument("request_id", help="the request id (see apm request ls)")
    ap.add_argument("--duration", type=int, metavar="M", help="minutes (default: as asked)")
    ap.add_argument("--reason", help="a note for the audit log")
    ap.add_argument(
        "--use",
        action="store_true",
        help="grant use only (apm run) even if the request asked to reveal the value",
    )
    add_page_options(ap)
    common(ap)
    dn = rsub.add_parser("deny", help="refuse the access (no password needed)")
    dn.add_argument("request_id", help="the request id (see apm request ls)")
    dn.add_argument("--reason", help="a note for the audit log and the agent")
    common(dn, pw=False)
    rv = rsub.add_parser("revoke", help="end an approved grant now (no password needed)")
    rv.add_argument("request_id", help="the request id (see apm request ls)")
    common(rv, pw=False)
    w = rsub.add_parser("watch", help="print new requests as they arrive, with the approve command")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between checks")
    common(w)
