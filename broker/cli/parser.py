"""The argument parser every `apm` command uses: argparse, plus "did you mean" for a mistyped
command or choice. Stdlib only (the one-shot path uses it too).
"""

from __future__ import annotations

import argparse
from typing import Any


class Parser(argparse.ArgumentParser):
    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if "--json" in args and not kwargs.get("help"):  # the same meaning on every command
            kwargs["help"] = "machine-readable output (JSON)"
        return super().add_argument(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices or not isinstance(value, str):
            super()._check_value(action, value)
            return
        import difflib  # only on a mistake: keeps the one-shot start-up lean

        names = [str(c) for c in choices]
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
        if not close:  # a prefix or a substring is a good guess too ("pass" -> "passwd")
            close = [n for n in names if n.startswith(value) or (len(value) > 2 and value in n)]
        what = "command" if isinstance(action, argparse._SubParsersAction) else "choice"
        message = f"unknown {what} {value!r}"
        if close:
            message += f"; did you mean {' or '.join(repr(c) for c in close[:3])}?"
        else:
            message += f" (choose from {', '.join(names)})"
        raise argparse.ArgumentError(action, message)
