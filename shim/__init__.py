"""apm-mcp: the stdio MCP relay (stdlib + pyzmq only)."""
