"""The wire contract between the CLI/shim and the broker (pydantic only)."""
