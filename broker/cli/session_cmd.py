"""`apm delegate` and `apm session ls|show|why|revoke|shell`: ephemeral sessions for agents.

Rules:
- The token is printed exactly once, at creation, on stdout; nothing else ever shows it.
- Delegating needs the master password now; revoking never needs it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import UTC, datetime

from broker.wire.display import escape
from broker.wire.errors import InvalidParameters
from broker.wire.protocol import (
    SCOPE_NAMES,
    SessionCreateParams,
    SessionInfo,
    SessionRef,
    SessionRevokeParams,
)

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info, table, write_lines

AGENTS = ("claude-desktop", "claude-code", "cursor", "vscode", "windsurf")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90s', '15m', '8h', '30d' (or combinations like '1h30m') -> seconds."""
    parts = re.findall(r"(\d+)([smhd])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise InvalidParameters(
            f"cannot read duration {text[:32]!r}", hint="use forms like 90s, 15m, 8h or 30d"
        )
    return sum(int(n) * _UNITS[u] for n, u in parts)


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except InvalidParameters as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def _when(dt: datetime | None) -> str:
    if dt is None:
        return "-"
    local = dt.astimezone()
    left = (dt - datetime.now(UTC)).total_seconds()
    rel = ""
    if left > 0:
        rel = f" (in {_human(int(left))})"
    return local.strftime("%Y-%m-%d %H:%M:%S") + rel


def _human(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def describe_bindings(b: dict[str, object]) -> str:
    """One line, escaped: process names and paths are whatever their creators chose."""
    parts = ["host" if b.get("host") else "any host"]
    pid = b.get("pid")
    if isinstance(pid, dict):
        parts.append(f"pid {pid.get('pid')} ({pid.get('name')})")
    if b.get("agent"):
        parts.append(f"agent {b['agent']}")
    if b.get("agent_exe"):
        parts.append(f"exe {b['agent_exe']}")
    exe_pin = b.get("agent_exe_pin")
    if isinstance(exe_pin, dict):
        parts.append(f"exe file pinned ({exe_pin.get('mode')})")
    pin = b.get("pin")
    if isinstance(pin, dict):
        parts.append(f"pinned to pid {pin.get('pid')} ({pin.get('name')})")
    elif pin:
        parts.append("pin on first use")
    return escape(", ".join(parts))


def _details(s: SessionInfo) -> list[str]:
    lines = [
        f"accessor:  {s.accessor}",
        f"label:     {escape(s.label or '-')}",
        f"scopes:    {', '.join(s.scopes)}",
        f"state:     {s.state}",
        f"bindings:  {describe_bindings(s.bindings)}",
        f"approves:  {s.approve} (writes)",
        f"expires:   {_when(s.expires_at)}",
    ]
    if s.idle_seconds:
        lines.append(f"idle:      ends after {_human(s.idle_seconds)} unused")
    if s.max_uses:
        lines.append(f"uses:      {s.use_count} of {s.max_uses}")
    else:
        lines.append(f"uses:      {s.use_count}")
    if s.filter:
        lines.append(
            "entries:   "
            + "; ".join(f"{escape(k)}: {', '.join(map(escape, v))}" for k, v in s.filter.items())
        )
    if s.last_used_at:
        lines.append(f"last used: {_when(s.last_used_at)}")
    if s.tool_names:
        lines.append(f"MCP names: {escape(s.tool_names)} (just-in-time tools)")
    if s.declared_agent:
        lines.append(f"declared:  {escape(s.declared_agent)}")
    return lines


def create_params(args: argparse.Namespace, **overrides: object) -> SessionCreateParams:
    doc = {
        "label": args.label or "",
        "scope": args.scope,
        "ttl_seconds": args.ttl,
        "idle_seconds": getattr(args, "idle", None),
        "max_uses": getattr(args, "max_uses", None),
        "bind_host": getattr(args, "bind_host", True),
        "pid": getattr(args, "pid", None),
        "agent": getattr(args, "agent", None),
        "agent_exe": getattr(args, "agent_exe", None),
        "agent_exe_pin": getattr(args, "agent_exe_pin", None),
        "pin": getattr(args, "pin", False),
        "approve": getattr(args, "approve", "agent"),
        "tool_names": getattr(args, "tool_names", None),
        "spaces": getattr(args, "space", None) or [],
        "tags": getattr(args, "tag", None) or [],
        "entries": getattr(args, "entries", None) or [],
    }
    doc.update(overrides)
    return SessionCreateParams.model_validate(doc)


def cmd_delegate(args: argparse.Namespace) -> int:
    owner = Credentials(args, owner_only=True)
    with BrokerClient() as c:
        res = c.call("session.create", create_params(args), **owner.creds())
    token = res.token.get_secret_value()
    if args.json:
        emit_json(
            {
                "token": token,
                "accessor": res.session.accessor,
                "scopes": res.session.scopes,
                "bindings": res.session.bindings,
                "expires_at": res.session.expires_at.isoformat(),
                "session": res.session.model_dump(mode="json"),
            }
        )
        return 0
    sys.stdout.write(f"APM_EPHEMERAL_ID={token}\n")
    write_lines(_details(res.session))
    info("the token is shown only this once; give it to the agent through its environment")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    owner = Credentials(args, owner_only=True)
    shell_pid = os.getppid()
    with BrokerClient() as c:
        res = c.call(
            "session.create",
            create_params(args, pid=shell_pid, label=args.label or f"shell {shell_pid}"),
            **owner.creds(),
        )
    sys.stdout.write(f"export APM_EPHEMERAL_ID={res.token.get_secret_value()}\n")
    info(
        f"session {res.session.accessor} ({', '.join(res.session.scopes)}) bound to this shell "
        f"(pid {shell_pid}), expires {_when(res.session.expires_at)}"
    )
    return 0


def cmd_session(args: argparse.Namespace) -> int:
    with BrokerClient() as c:
        if args.session_cmd == "revoke":
            if bool(args.accessor) == bool(args.all):
                raise InvalidParameters(
                    "name one accessor or pass --all", hint='run "apm session ls"'
                )
            res = c.call(
                "session.revoke", SessionRevokeParams(accessor=args.accessor, all=args.all)
            )
            if args.json:
                emit_json(res)
            elif res.pending:
                info("vault is locked: the revocation is recorded and applied at the next unlock")
            else:
                info(f"revoked {len(res.revoked)} session(s): {', '.join(res.revoked) or '-'}")
            return 0
        who = Credentials(args)
        if args.session_cmd == "ls":
            res = c.call("session.list", **who.creds())
            if args.json:
                emit_json(res.sessions)
            elif res.sessions:
                table(
                    ("ACCESSOR", "LABEL", "SCOPE", "STATE", "EXPIRES", "USES", "BINDINGS"),
                    [
                        (
                            s.accessor,
                            s.label or "-",
                            s.scope,
                            s.state,
                            s.expires_at.astimezone().strftime("%Y-%m-%d %H:%M"),
                            str(s.use_count),
                            describe_bindings(s.bindings),
                        )
                        for s in res.sessions
                    ],
                )
            else:
                info('no sessions; create one with "apm delegate"')
            return 0
        ref = SessionRef(accessor=args.accessor)
        if args.session_cmd == "show":
            res = c.call("session.show", ref, **who.creds())
            if args.json:
                emit_json(res)
            else:
                write_lines(_details(res))
            return 0
        res = c.call("session.why", ref, **who.creds())
        if args.json:
            emit_json(res)
            return 0
        out = _details(res.session)
        if not res.denials:
            out.append("no denials recorded since the broker started")
        for d in res.denials:
            when = d.at.astimezone().strftime("%H:%M:%S")
            out.append(f"denied {when} pid {d.peer_pid}: {escape(d.reason)}")
            out += [f"    ancestry: {escape(line)}" for line in d.seen]
        write_lines(out)
    return 0


def _pw(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )


def _session_opts(p: argparse.ArgumentParser, default_scope: str, default_ttl: str) -> None:
    p.add_argument("--label", help="a name for listings and the audit log")
    p.add_argument(
        "--scope",
        choices=SCOPE_NAMES,
        default=default_scope,
        help=f"cumulative: read < secrets < write < admin (default {default_scope})",
    )
    p.add_argument(
        "--ttl",
        type=_duration,
        default=parse_duration(default_ttl),
        help=f"lifetime, e.g. 15m, 8h, 30d (default {default_ttl})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _pw(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "delegate",
        help="create an ephemeral session for an AI client (needs the master password)",
        description="Create a session token for an AI client. The token is printed once as "
        "APM_EPHEMERAL_ID=...; the broker keeps only its hash. Bindings are checked on every "
        "request against what the kernel reports about the calling process.",
    )
    _session_opts(p, "read", "15m")
    p.add_argument("--idle", type=_duration, help="end the session after this long unused")
    p.add_argument("--max-uses", type=int, metavar="N", help="end the session after N requests")
    p.add_argument(
        "--bind-host",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="only this machine and user (default on)",
    )
    p.add_argument("--pid", type=int, metavar="N", help="only process N and its descendants")
    p.add_argument(
        "--tool-names",
        choices=("apm", "apono"),
        help="MCP names of the just-in-time tools for this session: apm (request_access, ...) "
        "or apono (user_create_request, ...); default: the broker's [mcp] tool_names",
    )
    agent = p.add_mutually_exclusive_group()
    agent.add_argument(
        "--agent", choices=AGENTS, help="only processes descending from this AI client"
    )
    agent.add_argument("--agent-exe", metavar="PATH", help="only descendants of this executable")
    p.add_argument(
        "--agent-exe-pin",
        choices=("stat", "sha256"),
        help="with --agent-exe: also pin that file (stat: device, inode, size, mtime; sha256: "
        "its content); a changed or replaced file is refused until you re-pin",
    )
    p.add_argument(
        "--pin", action="store_true", help="bind to the first process tree that uses the session"
    )
    p.add_argument(
        "--approve",
        choices=("agent", "client", "owner"),
        default="agent",
        help="who approves this session's writes: the agent itself (default), the person "
        "through the MCP client (elicitation), or the owner with apm tx approve",
    )
    p.add_argument("--space", action="append", metavar="S", help="only entries in these spaces")
    p.add_argument("--tag", action="append", metavar="T", help="only entries with these tags")
    p.add_argument("--entries", action="append", metavar="GLOB", help="only names matching")
    p.set_defaults(func=cmd_delegate)

    p = sub.add_parser("session", help="list, inspect, revoke sessions; a session for your shell")
    ssub = p.add_subparsers(dest="session_cmd", required=True, metavar="COMMAND")
    ls = ssub.add_parser("ls", help="list sessions")
    ls.add_argument("--json", action="store_true")
    _pw(ls)
    ls.set_defaults(func=cmd_session)
    show = ssub.add_parser("show", help="one session's details")
    show.add_argument("accessor", help="the session's ses_... accessor (see apm session ls)")
    show.add_argument("--json", action="store_true")
    _pw(show)
    show.set_defaults(func=cmd_session)
    why = ssub.add_parser("why", help="why requests with this session were denied")
    why.add_argument("accessor", help="the session's ses_... accessor (see apm session ls)")
    why.add_argument("--json", action="store_true")
    _pw(why)
    why.set_defaults(func=cmd_session)
    rv = ssub.add_parser("revoke", help="revoke a session now (no password needed)")
    rv.add_argument(
        "accessor", nargs="?", help="the session's ses_... accessor (see apm session ls)"
    )
    rv.add_argument("--all", action="store_true", help="revoke every session")
    rv.add_argument("--json", action="store_true")
    rv.set_defaults(func=cmd_session)
    sh = ssub.add_parser(
        "shell",
        help='a session bound to this shell: eval "$(apm session shell)"',
        description="Print `export APM_EPHEMERAL_ID=...` for a session bound (pid) to the "
        "invoking shell, so apm commands in it need no password. Programs started from this "
        "shell inherit it: do not start AI agents from it.",
    )
    _session_opts(sh, "secrets", "30m")
    sh.set_defaults(func=cmd_shell)
