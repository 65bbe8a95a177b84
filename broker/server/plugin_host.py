"""Plugins that run inside the broker: `notifier.*` entry points the owner enabled.

A notifier is `notify(title: str, body: str, payload: dict) -> None`, called for the same
events as the desktop and webhook notifications (access requests and their decisions), with
the same payload (never a secret).

Rules:
- Only entry points named in the enabled list (`broker.plugin_state`) are loaded; apm's own
  distribution is never asked, and nothing is loaded until there is something to deliver.
- A plugin is loaded and called in a worker thread, each call bounded by a timeout; anything it
  raises — even SystemExit — is caught there, logged by plugin name, and the plugin is skipped.
  A plugin never takes the broker down and never delays the request that triggered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from broker.plugin_state import read_enabled

log = logging.getLogger("apm.broker.plugins")

GROUP = "apm.plugins"
CALL_TIMEOUT = 10.0
Notify = Callable[[str, str, dict[str, Any]], object]
T = TypeVar("T")


def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run `fn` in a daemon thread: a plugin stuck forever cannot hold up the broker's exit
    (the default executor's threads are joined at shutdown)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        result = fn(*args)  # _load and _call never raise

        def settle() -> None:
            if not fut.done():  # a timed-out wait has cancelled it
                fut.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="apm-plugin", daemon=True).start()
    return fut


def _load(name: str) -> Notify | str:
    """The plugin's callable, or a short reason it could not be had (runs in a thread)."""
    from importlib.metadata import entry_points

    try:
        eps = [ep for ep in entry_points(group=GROUP) if ep.name == name]
        if not eps:
            return "not installed"
        fn = eps[0].load()
    except BaseException as exc:  # a plugin's import may do anything, exit included
        return f"failed to load ({type(exc).__name__})"
    if not callable(fn):
        return "is not callable"
    notify: Notify = fn
    return notify


def _call(fn: Notify, title: str, body: str, payload: dict[str, Any]) -> str | None:
    try:
        fn(title, body, payload)
    except BaseException as exc:  # isolate everything, SystemExit and KeyboardInterrupt too
        return type(exc).__name__
    return None


class PluginHost:
    def __init__(self) -> None:
        self._loaded: dict[str, Notify | str] = {}

    def enabled_notifiers(self) -> list[str]:
        return sorted(n for n in read_enabled() if n.startswith("notifier."))

    async def deliver(self, title: str, body: str, payload: dict[str, Any]) -> None:
        for name in self.enabled_notifiers():
            if name not in self._loaded:
                self._loaded[name] = await _in_daemon_thread(_load, name)
                if isinstance(self._loaded[name], str):
                    log.error("plugin %s %s; it is skipped", name, self._loaded[name])
            fn = self._loaded[name]
            if isinstance(fn, str):
                continue
            try:
                failed = await asyncio.wait_for(
                    _in_daemon_thread(_call, fn, title, body, dict(payload)), CALL_TIMEOUT
                )
            except TimeoutError:
                failed = f"timed out after {CALL_TIMEOUT:.0f} s"
            if failed:
                log.error("plugin %s failed: %s", name, failed)


HOST = PluginHost()
