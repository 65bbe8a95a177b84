"""`apm-mcp`: the stdio relay between an MCP client and the broker (its body lands with MCP)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    sys.stderr.write("apm-mcp: the MCP relay is not available in this version\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
