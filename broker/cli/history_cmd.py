"""`apm history NAME` and `apm restore NAME --version N`: an entry's previous secret values.

Rules:
- Values are masked unless --reveal, which needs the master password (never a session).
- A restore needs the master password; the value it replaces becomes version 1, so a restore
  can itself be undone.
"""

from __future__ import annotations

import argparse

from broker.wire.protocol import EntryHistoryParams, EntryRestoreParams

from .auth import Credentials
from .client import BrokerClient
from .output import emit_json, info, table

MASK = "********"


def cmd_history(args: argparse.Namespace) -> int:
    who = Credentials(args, owner_only=args.reveal)
    with BrokerClient() as c:
        res = c.call(
            "entry.history",
            EntryHistoryParams(ref=args.name, space=args.space, reveal=args.reveal),
            **who.creds(),
        )
    versions = [v for v in res.versions if args.field is None or v.field == args.field]
    if args.json:
        emit_json(
            [
                {
                    "field": v.field,
                    "version": v.version,
                    "replaced_at": v.replaced_at.isoformat() if v.replaced_at else None,
                    "value": v.value.get_secret_value() if v.value is not None else None,
                }
                for v in versions
            ]
        )
        return 0
    if not versions:
        info(
            f"{res.name!r} has no secret fields" + (f" named {args.field!r}" if args.field else "")
        )
        return 0
    rows = [
        [
            v.field,
            str(v.version) if v.version else "current",
            v.replaced_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if v.replaced_at else "-",
            # table() escapes every cell (broker.wire.display): newlines and control
            # characters are made visible, not acted on
            v.value.get_secret_value() if v.value is not None else MASK,
        ]
        for v in versions
    ]
    table(("FIELD", "VERSION", "REPLACED", "VALUE"), rows)
    if not any(v.version for v in versions):
        info("no previous values kept yet (each change of a secret keeps the one before it)")
    elif not args.reveal:
        info(f'bring one back with "apm restore {args.name} --version N [--field F]"')
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    owner = Credentials(args, owner_only=True)
    with BrokerClient() as c:
        res = c.call(
            "entry.restore",
            EntryRestoreParams(
                ref=args.name, space=args.space, field=args.field, version=args.version
            ),
            **owner.creds(),
        )
    if args.json:
        emit_json(res.entry)
    else:
        info(
            f"restored version {args.version} of {res.entry.name!r}"
            + (f" field {args.field!r}" if args.field else "")
            + "; the value it replaced is kept as version 1"
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "history",
        help="list an entry's previous secret values (masked; --reveal with the master password)",
        description="List the secret values an entry keeps: version 0 is the current one, 1 "
        "the one before it, and so on (up to 10 per field). Values are masked unless --reveal, "
        "which asks for the master password even when APM_EPHEMERAL_ID is set.",
    )
    p.add_argument("name", help="entry name or id")
    p.add_argument("--space", help="the space the entry is in (needed if the name is in several)")
    p.add_argument("--field", help="only this secret field")
    p.add_argument(
        "--reveal",
        action="store_true",
        help="show the values in clear (owner only: asks for the master password)",
    )
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "restore",
        help="bring back a previous secret value (asks for the master password)",
        description="Make version N of a secret field (see apm history) its current value. The "
        "value it replaces is kept as version 1, so a restore can be undone the same way.",
    )
    p.add_argument("name", help="entry name or id")
    p.add_argument(
        "--version",
        type=int,
        required=True,
        metavar="N",
        help="the version to bring back, as apm history numbers them (1 = the previous value)",
    )
    p.add_argument("--field", help="the secret field to restore (default: the type's main secret)")
    p.add_argument("--space", help="the space the entry is in (needed if the name is in several)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_restore)
