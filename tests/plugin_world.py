"""A real broker and CLI that see a plugin distribution installed in SITE (on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import Apm, Broker, make_home, reap_brokers


@contextmanager
def plugin_world(
    site: Path, env: dict[str, str] | None = None, config: str | None = None
) -> Iterator[tuple[Apm, Broker, Path]]:
    """An initialised vault (interactive profile); `config` is the broker's config.toml."""
    home = make_home()
    if config is not None:
        (home / "config").mkdir(parents=True)
        (home / "config" / "config.toml").write_text(config)
    broker = Broker(home, extra_env={"PYTHONPATH": str(site), **(env or {})}).start()
    apm = Apm(home, env={"PYTHONPATH": str(site)})
    try:
        apm.ok("init", "--profile", "interactive")
        yield apm, broker, home
    finally:
        broker.stop()
        reap_brokers(home)
