"""`apm generate` and `apm add --generate`: passwords from the same generator as the MCP tool.

Rules:
- The generated value goes to stdout (or the clipboard) only; never to stderr or a log.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import SecretStr

from broker.plugin_registry import entry_type
from broker.wire.errors import InvalidParameters
from broker.wire.passwords import DEFAULT_LENGTH, MAX_LENGTH, MIN_LENGTH, generate_password
from broker.wire.protocol import SecretValue


def _from_args(args: argparse.Namespace) -> str:
    return generate_password(
        args.length,
        lowercase=not args.no_lowercase,
        uppercase=not args.no_uppercase,
        digits=not args.no_digits,
        symbols=not args.no_symbols,
    )


def generated_secrets(args: argparse.Namespace, type_: str) -> dict[str, SecretValue]:
    """For `apm add --generate`: the named (or main) secret field, filled by the generator."""
    wanted = list(args.secret_field or [])
    target = wanted[0] if wanted else entry_type(type_).primary
    if target is None:
        raise InvalidParameters("name the secret field to generate with --secret-field F")
    if args.from_stdin:
        raise InvalidParameters("--generate and --from-stdin exclude each other")
    return {target: SecretValue(value=SecretStr(_from_args(args)))}


def cmd_generate(args: argparse.Namespace) -> int:
    value = _from_args(args)
    if getattr(args, "clip", False):
        from .clipboard import copy_and_schedule_clear

        copy_and_schedule_clear(value, args.clear_after)
        return 0
    sys.stdout.write(value + ("" if args.no_newline else "\n"))
    sys.stdout.flush()
    return 0


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--length",
        type=int,
        default=DEFAULT_LENGTH,
        metavar="N",
        help=f"password length, {MIN_LENGTH}-{MAX_LENGTH} (default {DEFAULT_LENGTH})",
    )
    p.add_argument("--no-lowercase", action="store_true", help="leave out a-z")
    p.add_argument("--no-uppercase", action="store_true", help="leave out A-Z")
    p.add_argument("--no-digits", action="store_true", help="leave out 0-9")
    p.add_argument("--no-symbols", action="store_true", help="leave out punctuation")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="print a random password (the generator the MCP tool uses)",
        description="Print a random password from the OS's secure random source, with at least "
        "one character of every class asked for. It needs no broker and no vault.",
    )
    add_options(p)
    p.add_argument("-n", "--no-newline", action="store_true", help="no trailing newline")
    p.add_argument(
        "--clip", action="store_true", help="copy to the clipboard instead of printing it"
    )
    p.add_argument(
        "--clear-after",
        type=int,
        default=20,
        metavar="S",
        help="with --clip: clear the clipboard after S seconds (default 20)",
    )
    p.set_defaults(func=cmd_generate)
