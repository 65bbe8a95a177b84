"""`apm import FORMAT FILE`: bring entries in from KeePass, Bitwarden, 1Password, pass, browser
CSVs and .env files.

Rules:
- Nothing read from the file is ever printed: the summary names entries and reasons only.
- The export's own password (Bitwarden, KeePass) is asked on the terminal, or read from the
  next stdin line with --source-password-stdin (after the master password's line).
- Entries go through `batch.commit_entries`, the one bulk path (entry.add_batch when the
  broker has it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from broker.wire.entries import SPACE_PATTERN
from broker.wire.errors import InvalidParameters

from .auth import Credentials
from .output import info
from .prompt import Input


def _source_password(args: argparse.Namespace) -> Callable[[str], SecretStr]:
    src = Input(args.source_password_stdin)

    def ask(label: str) -> SecretStr:
        if args.keyfile:  # a key file alone may open a KeePass database: empty is allowed
            line = f"{label} (empty if none)"
            return SecretStr(src._stdin_line(label) if src.password_stdin else src._ask(line))
        return src.password(label)

    return ask


def cmd_import(args: argparse.Namespace) -> int:
    import re

    from . import plugins
    from .batch import Summary, commit_entries, print_summary
    from .importers import ImportContext, build

    if args.space and not re.match(SPACE_PATTERN, args.space):
        raise InvalidParameters("invalid space name", data={"field": "space"})
    loader = plugins.importer(args.format)
    path = Path(args.file).expanduser()
    if not path.exists():
        raise InvalidParameters(f"no such file or directory: {args.file}")
    who = Credentials(args)
    if not args.dry_run:
        who.prime()  # the master password's line comes first on stdin
    ctx = ImportContext(
        source_password=_source_password(args),
        keyfile=Path(args.keyfile).expanduser() if args.keyfile else None,
    )
    loaded = loader(path, ctx)
    params, failed = build(loaded, args.space or "default", args.format)
    kinds = Counter(p.type for p in params)
    if args.dry_run:
        summary = Summary(added=[p.name for p in params], failed=failed)
        if args.json:
            sys.stdout.write(json.dumps({**summary.as_dict(), "types": kinds}, indent=2) + "\n")
        else:
            print_summary(summary, dry_run=True)
            info("by type: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
            info("dry run: nothing was written")
        return 0
    from .client import BrokerClient

    with BrokerClient() as c:
        summary = commit_entries(
            c, who.creds(), params, args.on_duplicate, summary=Summary(failed=list(failed))
        )
    if args.json:
        sys.stdout.write(json.dumps({**summary.as_dict(), "types": kinds}, indent=2) + "\n")
    else:
        print_summary(summary)
        if not summary.used_batch and params:
            info("(added one by one: this broker has no batch method)")
    return 0 if not summary.failed else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .plugins import IMPORTER_HELP

    p = sub.add_parser(
        "import",
        help="import entries from another password manager or a .env file",
        description="Import entries from another tool's export. Formats: "
        + IMPORTER_HELP
        + ". Logins become login entries; TOTP seeds a companion totp entry; custom fields "
        "and notes a companion custom entry (notes as secret fields); folders become tags. "
        "Ends with a summary (added, skipped, renamed, failed with reasons); never prints a "
        "secret.",
    )
    p.add_argument("format", metavar="FORMAT", help="one of: " + IMPORTER_HELP)
    p.add_argument("file", metavar="FILE", help="the export file (pass: the store directory)")
    p.add_argument("--space", help="space to import into (default: default; created if needed)")
    p.add_argument("--dry-run", action="store_true", help="read the file and report; write nothing")
    p.add_argument(
        "--on-duplicate",
        choices=("skip", "rename", "overwrite"),
        default="skip",
        help="when an entry with the same name exists in the space (default skip)",
    )
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the master password from the first line of stdin",
    )
    p.add_argument(
        "--source-password-stdin",
        action="store_true",
        help="read the export's own password (Bitwarden, KeePass) from the next stdin line",
    )
    p.add_argument("--keyfile", metavar="FILE", help="KeePass: the database's key file")
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    p.set_defaults(func=cmd_import)
