"""Plugins: the `apm.plugins` entry-point group (importers, notifiers, entry types).

An entry point is named `KIND.NAME` (`importer.keepass`, `notifier.ntfy`, `entry_type.x`) and
points at an object (`module:attr`). apm's own importers are declared in the same group by
its pyproject, and also listed here so a checkout without installed metadata still has them.
A third-party plugin is listed but never loaded until the owner enables it.

Rules:
- Discovery reads metadata only (`importlib.metadata`); nothing is imported until used.
- A plugin that fails to load is a clear error naming it, never a traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.wire.errors import InvalidParameters

GROUP = "apm.plugins"
BUILTIN_DIST = "apm-broker"
BUILTINS: dict[str, str] = {
    "importer.keepass": "broker.cli.importers.keepass:load",
    "importer.bitwarden": "broker.cli.importers.bitwarden:load",
    "importer.1password": "broker.cli.importers.onepassword:load_1pux",
    "importer.1password-csv": "broker.cli.importers.onepassword:load_csv",
    "importer.pass": "broker.cli.importers.pass_store:load",
    "importer.browser-csv": "broker.cli.importers.browser_csv:load",
    "importer.env": "broker.cli.importers.envfile:load",
}
IMPORTER_HELP = ", ".join(k.split(".", 1)[1] for k in BUILTINS)


@dataclass(frozen=True)
class Plugin:
    name: str  # KIND.NAME
    target: str  # module:attr
    dist: str
    builtin: bool

    @property
    def kind(self) -> str:
        return self.name.split(".", 1)[0]


def discover() -> list[Plugin]:
    from importlib.metadata import entry_points

    found = {n: Plugin(n, t, BUILTIN_DIST, True) for n, t in BUILTINS.items()}
    for ep in entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        builtin = dist == BUILTIN_DIST and ep.name in BUILTINS
        if ep.name in found and not builtin:
            continue  # a third party cannot replace a built-in
        found[ep.name] = Plugin(ep.name, ep.value, dist, builtin)
    return sorted(found.values(), key=lambda p: p.name)


def load_target(plugin: Plugin) -> Any:
    module, _, attr = plugin.target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:  # a plugin's import may raise anything: report, don't crash
        raise InvalidParameters(
            f"plugin {plugin.name} ({plugin.dist}) failed to load: {type(exc).__name__}",
            hint=f'disable it with "apm plugin disable {plugin.name}"',
        ) from exc
    return obj


def enabled_names(path: Path | None = None) -> set[str]:
    from broker.plugin_state import read_enabled

    return read_enabled(path)


def importer(fmt: str) -> Callable[..., Any]:
    name = f"importer.{fmt}"
    plugins = {p.name: p for p in discover()}
    plugin = plugins.get(name)
    if plugin is None:
        known = ", ".join(p.name.split(".", 1)[1] for p in plugins.values() if p.kind == "importer")
        raise InvalidParameters(f"unknown import format: {fmt[:40]}", hint=f"formats: {known}")
    if not plugin.builtin and name not in enabled_names():
        raise InvalidParameters(
            f"the importer {fmt} comes from the plugin {plugin.dist}, which is not enabled",
            hint=f'enable it with "apm plugin enable {name}"',
        )
    fn: Callable[..., Any] = load_target(plugin)
    return fn
