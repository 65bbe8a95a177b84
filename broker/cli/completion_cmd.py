"""`apm completion bash|zsh|fish` and `apm man` (the generators live in `completion`)."""

from __future__ import annotations

import argparse
import sys


def cmd_completion(args: argparse.Namespace, root: argparse.ArgumentParser) -> int:
    from . import completion

    script = {"bash": completion.bash, "zsh": completion.zsh, "fish": completion.fish}
    sys.stdout.write(script[args.shell](root))
    return 0


def cmd_man(args: argparse.Namespace, root: argparse.ArgumentParser) -> int:
    from .completion import man

    sys.stdout.write(man(root))
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], root: argparse.ArgumentParser
) -> None:
    """`root`: apm's whole parser, which the generators describe (handed in by `main`)."""
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, fish)",
        description="Print a completion script generated from apm's own parser. bash: "
        'eval "$(apm completion bash)" in ~/.bashrc; zsh: apm completion zsh > '
        "~/.zfunc/_apm (with ~/.zfunc in fpath); fish: apm completion fish > "
        "~/.config/fish/completions/apm.fish",
    )
    p.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell to complete for")
    p.set_defaults(func=lambda args: cmd_completion(args, root))
    p = sub.add_parser(
        "man",
        help="print apm's man page (roff), generated from the parser",
        description="Print the apm(1) man page. View it with: apm man | man -l -",
    )
    p.set_defaults(func=lambda args: cmd_man(args, root))
