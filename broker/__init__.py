"""apm: a local secret broker for AI agents."""

__version__ = "0.1.0"
