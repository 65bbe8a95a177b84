"""`apm sync init|invite|join|approve|remove|status|revoke-sessions`: spaces shared with other
devices through an etcd cluster.

Rules:
- Every command but `status` is an owner operation: the master password, proven now.
- A join code is shown once, on stdout, and read back from argv by `apm sync join` only on the
  other device; it is one-time (approval consumes it) and carries no key.
"""

from __future__ import annotations

import argparse
import sys

from broker.wire.protocol import (
    SyncDeviceParams,
    SyncInitParams,
    SyncJoinParams,
    SyncSpaceParams,
    SyncTls,
)

from .auth import Credentials
from .client import BrokerClient
from .entry_cmd import _common
from .output import emit_json, info, table

# etcd writes without quorum answer only after several seconds: give the broker room
SYNC_TIMEOUT = 60.0


def _endpoints(raw: list[str]) -> list[str]:
    return [u.strip() for item in raw for u in item.split(",") if u.strip()]


def _tls(args: argparse.Namespace) -> SyncTls:
    return SyncTls(cacert=args.cacert, cert=args.cert, key=args.key)


def cmd_sync(args: argparse.Namespace) -> int:
    sc = args.sync_cmd
    if sc == "status":
        with BrokerClient() as c:
            res = c.call("sync.status", timeout=SYNC_TIMEOUT)
        if args.json:
            emit_json(res)
            return 0
        if not res.configured:
            info('this vault syncs no space (set one up with "apm sync init")')
            return 0
        out = [f"device: {res.device}"]
        for ep in res.endpoints:
            state = "ok" if ep.get("ok") else f"DOWN ({ep.get('error', 'no answer')})"
            out.append(f"endpoint {ep['endpoint']}: {state}")
        sys.stdout.write("\n".join(out) + "\n")
        table(
            ("SPACE", "APPLIED", "BEHIND", "EPOCH", "MEMBERS", "JOINS", "REFUSED"),
            [
                (
                    s["name"],
                    str(s["applied_revision"]),
                    "?" if s.get("pending_changes") is None else str(s["pending_changes"]),
                    str(s["epoch"]),
                    ",".join(s["members"]),
                    ",".join(s["pending_joins"]) or "-",
                    str(len(s["refused"])),
                )
                for s in res.spaces
            ],
        )
        for s in res.spaces:
            for r in s["refused"]:
                sys.stdout.write(f"refused in {s['name']}: {r['key']}: {r['reason']}\n")
        return 0
    owner = Credentials(args, owner_only=True)
    with BrokerClient() as c:
        if sc == "init":
            res = c.call(
                "sync.init",
                SyncInitParams(endpoints=_endpoints(args.etcd), tls=_tls(args), space=args.space),
                timeout=SYNC_TIMEOUT,
                **owner.creds(),
            )
            msg = (
                f"space {res.space!r} is synced (id {res.space_id}, this device {res.device}, "
                f"{res.uploaded} entries uploaded)"
            )
        elif sc == "invite":
            res = c.call(
                "sync.invite",
                SyncSpaceParams(space=args.space),
                timeout=SYNC_TIMEOUT,
                **owner.creds(),
            )
            if args.json:
                emit_json({"space": res.space, "code": res.code.get_secret_value()})
                return 0
            sys.stdout.write(res.code.get_secret_value() + "\n")
            info(
                'one-time join code: on the other device run "apm sync join CODE --etcd URL..."'
                ', then approve it here with "apm sync approve DEVICE"'
            )
            return 0
        elif sc == "join":
            code = args.code
            if code == "-":  # kept out of argv: the line after the password on stdin
                owner.prime()
                code = sys.stdin.readline().strip()
            res = c.call(
                "sync.join",
                SyncJoinParams(code=code, endpoints=_endpoints(args.etcd), tls=_tls(args)),
                timeout=SYNC_TIMEOUT,
                **owner.creds(),
            )
            msg = (
                f"asked to join space {res.space!r} as device {res.device}; the admin device "
                f'approves with "apm sync approve {res.device}"'
            )
        else:
            method = {
                "approve": "sync.approve",
                "remove": "sync.remove",
                "revoke-sessions": "sync.revoke_sessions",
            }[sc]
            res = c.call(
                method,
                SyncDeviceParams(device=args.device, space=args.space),
                timeout=SYNC_TIMEOUT,
                **owner.creds(),
            )
            verb = {
                "approve": "approved",
                "remove": "removed (space re-keyed, entries re-sealed)",
                "revoke-sessions": "told to revoke its sessions",
            }[sc]
            msg = f"device {res.device} {verb} in space {res.space!r}"
    if args.json:
        emit_json(res)
    else:
        info(msg)
    return 0


def _etcd_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd", action="append", required=True, metavar="URL[,URL...]", help="etcd endpoints"
    )
    p.add_argument("--cacert", help="CA certificate file that signed the etcd members' certs")
    p.add_argument("--cert", help="this device's etcd client certificate file")
    p.add_argument("--key", help="this device's etcd client key file")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sync", help="share spaces with other devices through an etcd cluster")
    ssub = p.add_subparsers(dest="sync_cmd", required=True, metavar="COMMAND")
    init = ssub.add_parser("init", help="make a space synced, with this device as its admin")
    _etcd_opts(init)
    init.add_argument("--space", required=True, help="the space to sync")
    inv = ssub.add_parser("invite", help="print a one-time join code for a synced space")
    inv.add_argument("--space", required=True, help="the synced space to invite to")
    join = ssub.add_parser("join", help="ask to join a synced space with a join code")
    join.add_argument(
        "code", help='the code from "apm sync invite"; - reads it from stdin (keeps it out of argv)'
    )
    _etcd_opts(join)
    for name, text in (
        ("approve", "admit a device that ran apm sync join (its key is wrapped to it)"),
        ("remove", "remove a device: the space is re-keyed and its entries re-sealed"),
        ("revoke-sessions", "revoke every session on that device (it applies the record)"),
    ):
        sp = ssub.add_parser(name, help=text)
        sp.add_argument("device", help="the device id (apm sync status lists them)")
        sp.add_argument(
            "--space",
            required=name == "remove",
            help="the synced space the device belongs to",
        )
    status = ssub.add_parser(
        "status", help="endpoints, applied revision, lag, members, pending joins, refused"
    )
    for sp in (init, inv, join, status, *ssub.choices.values()):
        if "--password-stdin" not in sp._option_string_actions:
            _common(sp)
        sp.set_defaults(func=cmd_sync)
