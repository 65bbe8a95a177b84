"""`apm space ls|add|rename|rm`: spaces group entries (work, personal, a project...)."""

from __future__ import annotations

import argparse

from broker.wire.protocol import SpaceAddParams, SpaceRemoveParams, SpaceRenameParams

from .auth import Credentials
from .client import BrokerClient
from .entry_cmd import _common
from .output import emit_json, info, table


def cmd_space(args: argparse.Namespace) -> int:
    owner = Credentials(args)
    with BrokerClient() as c:
        if args.space_cmd == "ls":
            res = c.call("space.list", **owner.creds())
            if args.json:
                emit_json(res.spaces)
            else:
                table(("SPACE", "ENTRIES"), [(s.name, str(s.entries)) for s in res.spaces])
            return 0
        if args.space_cmd == "add":
            res = c.call("space.add", SpaceAddParams(name=args.name), **owner.creds())
            msg = f"created space {res.name!r}"
        elif args.space_cmd == "rename":
            res = c.call(
                "space.rename",
                SpaceRenameParams(name=args.name, new_name=args.new_name),
                **owner.creds(),
            )
            msg = f"renamed space to {res.name!r} ({res.entries} entries moved)"
        else:
            res = c.call(
                "space.remove", SpaceRemoveParams(name=args.name, force=args.force), **owner.creds()
            )
            msg = f"removed space {res.name!r} ({res.removed_entries} entries removed)"
    if args.json:
        emit_json(res)
    else:
        info(msg)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("space", help="list, create, rename or remove spaces")
    ssub = p.add_subparsers(dest="space_cmd", required=True, metavar="COMMAND")
    ls = ssub.add_parser("ls", help="list spaces with their entry counts")
    _common(ls)
    ls.set_defaults(func=cmd_space)
    add = ssub.add_parser("add", help="create a space")
    add.add_argument("name", help="the new space's name (letters, digits, _ . -)")
    _common(add)
    add.set_defaults(func=cmd_space)
    ren = ssub.add_parser("rename", help="rename a space (its entries move with it)")
    ren.add_argument("name", help="the space to rename")
    ren.add_argument("new_name", help="its new name")
    _common(ren)
    ren.set_defaults(func=cmd_space)
    rm = ssub.add_parser("rm", help="remove a space; --force removes its entries too")
    rm.add_argument("name", help="the space to remove")
    rm.add_argument(
        "--force", action="store_true", help="remove the entries in it too (they are lost)"
    )
    _common(rm)
    rm.set_defaults(func=cmd_space)
