"""Plugins on the CLI's side: importers found in the `apm.plugins` group, loaded when used.

Discovery, loading and entry types live in `broker.plugin_registry` (shared with the broker).

Rules:
- A third-party importer runs only once the owner enabled it.
- A plugin that fails to load is a clear error naming it (PLUGIN_UNAVAILABLE), never a
  traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.plugin_registry import BUILTINS as BUILTINS  # re-exported for the CLI
from broker.plugin_registry import IMPORTERS, enabled_names, load_target, not_enabled
from broker.plugin_registry import Plugin as Plugin
from broker.plugin_registry import discover as discover
from broker.wire.errors import InvalidParameters

IMPORTER_HELP = ", ".join(k.split(".", 1)[1] for k in IMPORTERS)


def importer(fmt: str) -> Callable[..., Any]:
    name = f"importer.{fmt}"
    plugins = {p.name: p for p in discover()}
    plugin = plugins.get(name)
    if plugin is None:
        known = ", ".join(p.name.split(".", 1)[1] for p in plugins.values() if p.kind == "importer")
        raise InvalidParameters(f"unknown import format: {fmt[:40]}", hint=f"formats: {known}")
    if not plugin.builtin and name not in enabled_names():
        raise not_enabled(plugin, f"the importer {fmt}")
    fn: Callable[..., Any] = load_target(plugin)
    return fn
