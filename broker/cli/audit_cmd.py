"""`apm audit [--since T] [--session ACCESSOR] [--json] [--follow]` and `apm audit verify`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.wire.display import escape
from broker.wire.errors import InvalidParameters
from broker.wire.protocol import AuditListParams

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info, write_lines
from .session_cmd import parse_duration

_SKIP = {"seq", "ts", "event", "prev", "mac"}


def parse_since(text: str) -> datetime:
    """An ISO time, or a duration back from now (15m, 2h, 7d)."""
    try:
        dt = datetime.fromisoformat(text)
        return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    except ValueError:
        pass
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except InvalidParameters as exc:
        raise InvalidParameters(
            f"cannot read --since {text[:32]!r}", hint="use an ISO time or 15m / 2h / 7d"
        ) from exc


def _line(rec: dict[str, Any]) -> str:
    ts = str(rec.get("ts", ""))[:19].replace("T", " ")
    rest = " ".join(f"{escape(k)}={escape(v)}" for k, v in rec.items() if k not in _SKIP)
    return f"{rec.get('seq', '?'):>6} {escape(ts)} {escape(rec.get('event', '?')):<18} {rest}"


def cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_cmd == "verify":
        with BrokerClient() as c:
            res = c.call("audit.verify")
        if args.json:
            emit_json(res)
        elif res.ok:
            info(f"audit log verified: {res.records} records, chain and codes intact")
        else:
            write_lines([escape(finding) for finding in res.findings])
            info(f"audit log has {len(res.findings)} problem(s)")
        if not args.json and res.warnings:
            for warning in res.warnings:
                sys.stdout.write(f"warning: {warning}\n")
            info(f"the log records {len(res.warnings)} incident(s): rollback or deletion")
        return 0 if res.ok else 1
    who = Credentials(args)
    params = AuditListParams(
        since=parse_since(args.since) if args.since else None,
        session=args.session,
        limit=args.limit,
    )
    with BrokerClient() as c:
        res = c.call("audit.list", params, **who.creds())
        records = res.records
        if args.json and not args.follow:
            emit_json(records)
            return 0
        # json.dumps escapes control characters (ensure_ascii); _line escapes every value
        write_lines([json.dumps(rec) if args.json else _line(rec) for rec in records])
        sys.stdout.flush()
        last = res.last_seq
        while args.follow:
            time.sleep(1.0)
            res = c.call("audit.list", params.model_copy(update={"after_seq": last}), **who.creds())
            write_lines([json.dumps(rec) if args.json else _line(rec) for rec in res.records])
            sys.stdout.flush()
            last = res.last_seq
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "audit",
        help="show or verify the tamper-evident audit log",
        description="Show the audit log (owner or an admin session): the last --limit matching "
        "records, oldest first. `apm audit verify` checks the hash chain and authentication "
        "codes of the whole log (vault unlocked; no password).",
    )
    p.add_argument("audit_cmd", nargs="?", choices=("verify",), help="verify the log")
    p.add_argument("--since", help="ISO time or a duration back from now (15m, 2h, 7d)")
    p.add_argument("--session", metavar="ACCESSOR", help="only this session's records")
    p.add_argument(
        "--limit",
        type=int,
        default=1000,
        metavar="N",
        help="show the last N matching records (default 1000, at most 10000)",
    )
    p.add_argument("--follow", action="store_true", help="keep printing new records")
    p.add_argument("--json", action="store_true", help="JSON (one array, or lines with --follow)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    p.set_defaults(func=cmd_audit)
