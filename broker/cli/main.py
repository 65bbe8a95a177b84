"""`apm`: the person's command line. Parses arguments and maps errors to messages and exit codes.

Rules:
- Start-up stays lean: this module imports only the stdlib at the top; the hot one-shot
  commands take `oneshot`'s path, and the full parser (every command module, pydantic) is
  built only for the others.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from broker import __version__

    from . import (
        audit_cmd,
        broker_cmd,
        completion_cmd,
        credential_cmd,
        doctor_cmd,
        entry_cmd,
        env_cmd,
        generate_cmd,
        history_cmd,
        import_cmd,
        mcp_cmd,
        passkey_cmd,
        plugin_cmd,
        request_cmd,
        run_cmd,
        session_cmd,
        space_cmd,
        storage_cmd,
        sync_cmd,
        tx_cmd,
        vault_cmd,
    )
    from .parser import Parser

    parser = Parser(
        prog="apm",
        description="apm: a local secret broker that lets AI agents use your credentials "
        "safely. The broker holds the vault key; this CLI talks to it.",
        epilog='Start with "apm init", then "apm add login NAME". Environment: APM_HOME, '
        "APM_VAULT_PATH, APM_BROKER_ADDR.",
    )
    parser.add_argument("--version", action="version", version=f"apm {__version__}")
    # typed as argparse's own: every command's register() takes that (subparsers are Parsers)
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(  # type: ignore[assignment]
        dest="command", required=True, metavar="COMMAND"
    )
    vault_cmd.register(sub)
    storage_cmd.register(sub)
    entry_cmd.register(sub)
    history_cmd.register(sub)
    generate_cmd.register(sub)
    space_cmd.register(sub)
    sync_cmd.register(sub)
    session_cmd.register(sub)
    mcp_cmd.register(sub)
    audit_cmd.register(sub)
    tx_cmd.register(sub)
    request_cmd.register(sub)
    passkey_cmd.register(sub)
    run_cmd.register(sub)
    env_cmd.register(sub)
    import_cmd.register(sub)
    plugin_cmd.register(sub)
    doctor_cmd.register(sub)
    broker_cmd.register(sub)
    credential_cmd.register(sub)
    completion_cmd.register(sub, parser)
    return parser


def report(exc: BaseException) -> int:
    """Print a failure the person can act on and return its exit code (never a traceback)."""
    from broker.wire.errors import ApmError

    if isinstance(exc, ApmError):
        from broker.wire.display import escape  # messages may quote names an agent chose

        sys.stderr.write(f"apm: error: {escape(exc.message, backslash=False)}\n")
        if exc.hint:
            sys.stderr.write(f"apm: hint: {escape(exc.hint, backslash=False)}\n")
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("apm: cancelled\n")
        return 130
    if isinstance(exc, BrokenPipeError):
        return 1
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(exc, pydantic.ValidationError):
        errors: list[dict[str, Any]] = exc.errors()
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in errors})
        sys.stderr.write(f"apm: error: invalid value for {', '.join(fields)}\n")
        sys.stderr.write('apm: hint: see "apm COMMAND --help"\n')
        return 10
    raise exc


def main(argv: list[str] | None = None, *, lean: bool = True) -> int:
    """Run one command; `lean=False` forces the full path (tests compare the two)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # `apm` alone: what it can do, not an error
        build_parser().print_help()
        return 0
    try:
        args = None
        if lean:
            from . import oneshot

            args = oneshot.parse(argv)
        if args is None:
            args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except (Exception, KeyboardInterrupt) as exc:
        return report(exc)


def git_main() -> int:
    """`git-credential-apm [--space S] ACTION`: what git runs for credential.helper=apm."""
    return main(["credential", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
