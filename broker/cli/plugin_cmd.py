"""`apm plugin ls|enable|disable`: the `apm.plugins` entry points and which ones are enabled.

Rules:
- Enabling runs a distribution's code inside apm, so it proves the master password first
  (like every owner operation). Disabling never needs it: safer is always one command away.
- apm never downloads or installs anything: a plugin is a distribution already installed in
  apm's environment (pip install it yourself, then enable it).
- The enabled list guards against running installed code by accident; a process of your own
  user can still edit it, as it can edit anything else of yours (see the README's threat model).
"""

from __future__ import annotations

import argparse
import json
import sys

from broker.wire.errors import EntryNotFound, InvalidParameters

from .output import info, table


def _state(name: str, builtin: bool, enabled: set[str]) -> str:
    if builtin:
        return "built-in"
    return "enabled" if name in enabled else "disabled"


def cmd_ls(args: argparse.Namespace) -> int:
    from broker.plugin_state import read_enabled

    from .plugins import discover

    enabled = read_enabled()
    plugins = discover()
    rows = [
        {
            "name": p.name,
            "kind": p.kind,
            "distribution": p.dist,
            "target": p.target,
            "state": _state(p.name, p.builtin, enabled),
        }
        for p in plugins
    ]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table(
            ("NAME", "KIND", "DISTRIBUTION", "STATE"),
            [[r["name"], r["kind"], r["distribution"], r["state"]] for r in rows],
        )
    return 0


def _find(name: str) -> list[str]:
    """Entry-point names matching NAME: one plugin (KIND.NAME) or a whole distribution."""
    from .plugins import discover

    plugins = discover()
    hits = [p for p in plugins if p.name == name or p.dist == name]
    if not hits:
        raise EntryNotFound(
            f"no installed plugin or distribution named {name[:80]!r}",
            hint='"apm plugin ls" lists them; apm never installs code: pip install it first',
        )
    if all(p.builtin for p in hits):
        raise InvalidParameters("built-in plugins are always enabled")
    return [p.name for p in hits if not p.builtin]


def cmd_enable(args: argparse.Namespace) -> int:
    from broker.plugin_state import read_enabled, write_enabled
    from broker.wire.protocol import TxListParams

    from .auth import Credentials
    from .client import BrokerClient

    names = _find(args.name)
    owner = Credentials(args, owner_only=True)
    with BrokerClient() as c:
        # tx.list is an owner-only, read-only call: it proves the master password now
        c.call("tx.list", TxListParams(pending=True), **owner.creds())
    enabled = read_enabled() | set(names)
    write_enabled(enabled)
    info("enabled " + ", ".join(names))
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    from broker.plugin_state import read_enabled, write_enabled

    from .plugins import discover

    enabled = read_enabled()
    names = {n for n in enabled if n == args.name} or {
        p.name for p in discover() if p.dist == args.name and p.name in enabled
    }
    if not names:
        info(f"{args.name} is not enabled")
        return 0
    write_enabled(enabled - names)
    info("disabled " + ", ".join(sorted(names)))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plugin",
        help="list, enable or disable plugins (the apm.plugins entry points)",
        description="Plugins are installed Python distributions declaring entry points in the "
        "apm.plugins group, named KIND.NAME (importer.x, notifier.x, entry_type.x). apm never "
        "installs code; a third-party plugin runs only after you enable it.",
    )
    psub = p.add_subparsers(dest="plugin_command", required=True, metavar="SUBCOMMAND")
    ls = psub.add_parser("ls", help="list plugins and their state")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    en = psub.add_parser("enable", help="enable a plugin or all of a distribution's (password)")
    en.add_argument("name", help="KIND.NAME, or a distribution name")
    en.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    en.set_defaults(func=cmd_enable)
    dis = psub.add_parser("disable", help="disable a plugin or a distribution's (no password)")
    dis.add_argument("name", help="KIND.NAME, or a distribution name")
    dis.set_defaults(func=cmd_disable)
