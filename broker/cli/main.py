"""`apm`: the person's command line. Parses arguments and maps errors to messages and exit codes."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from broker import __version__
from broker.wire.errors import ApmError

from . import (
    audit_cmd,
    broker_cmd,
    completion_cmd,
    credential_cmd,
    doctor_cmd,
    entry_cmd,
    env_cmd,
    generate_cmd,
    import_cmd,
    mcp_cmd,
    plugin_cmd,
    request_cmd,
    run_cmd,
    session_cmd,
    space_cmd,
    tx_cmd,
    vault_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apm",
        description="apm: a local secret broker that lets AI agents use your credentials "
        "safely. The broker holds the vault key; this CLI talks to it.",
        epilog='Start with "apm init", then "apm add login NAME". Environment: APM_HOME, '
        "APM_VAULT_PATH, APM_BROKER_ADDR.",
    )
    parser.add_argument("--version", action="version", version=f"apm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vault_cmd.register(sub)
    entry_cmd.register(sub)
    generate_cmd.register(sub)
    space_cmd.register(sub)
    session_cmd.register(sub)
    mcp_cmd.register(sub)
    audit_cmd.register(sub)
    tx_cmd.register(sub)
    request_cmd.register(sub)
    run_cmd.register(sub)
    env_cmd.register(sub)
    import_cmd.register(sub)
    plugin_cmd.register(sub)
    doctor_cmd.register(sub)
    broker_cmd.register(sub)
    credential_cmd.register(sub)
    completion_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ApmError as exc:
        sys.stderr.write(f"apm: error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"apm: hint: {exc.hint}\n")
        return exc.exit_code
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        sys.stderr.write(f"apm: error: invalid value for {', '.join(fields)}\n")
        sys.stderr.write('apm: hint: see "apm COMMAND --help"\n')
        return 10
    except KeyboardInterrupt:
        sys.stderr.write("apm: cancelled\n")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
