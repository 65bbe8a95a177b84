"""The `apm.plugins` entry-point group, shared by the CLI and the broker: discovery, loading,
and the entry types that plugins add.

An entry point is named `KIND.NAME` (`importer.keepass`, `notifier.ntfy`, `entry_type.x`) and
points at an object (`module:attr`). apm's own importers and entry types are declared in the
same group by its pyproject, and also listed here so a checkout without installed metadata
still has them. A third-party plugin is listed but never loaded until the owner enables it.

An entry-type plugin points at a mapping (or a `broker.wire.entries.TypeSpec`):

    {"fields": [{"name": "key", "secret": True, "required": True}, {"name": "region"}],
     "primary": "key",          # what `apm get` prints; default: the first secret field
     "validate": check}         # optional: check(fields, secrets), raises ValueError(reason)

The type's name is the entry point's NAME. `validate` gets the entry's non-secret fields and
the secret values being set, and its ValueError message is shown with those values blanked.

Rules:
- Discovery reads metadata only (`importlib.metadata`); nothing is imported until used.
- Loading or calling a plugin runs in a daemon thread, bounded by PLUGIN_TIMEOUT; whatever it
  raises (SystemExit too) becomes a `PluginUnavailable` naming it, never a traceback, and is
  remembered until the enabled list changes: a plugin never takes the broker down.
- Built-in types resolve without any of this (a dict lookup on the hot path).
- Entries of a type whose plugin is later disabled stay readable (their fields carry their
  own secret flags); adding or changing one needs the plugin.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.wire.entries import (
    ENTRY_TYPE_NAMES,
    ENTRY_TYPE_PATTERN,
    ENTRY_TYPES,
    FIELD_NAME_PATTERN,
    FieldSpec,
    TypeSpec,
)
from broker.wire.errors import ApmError, InvalidParameters, PluginUnavailable

GROUP = "apm.plugins"
BUILTIN_DIST = "apm-broker"
IMPORTERS: dict[str, str] = {
    "importer.keepass": "broker.cli.importers.keepass:load",
    "importer.bitwarden": "broker.cli.importers.bitwarden:load",
    "importer.1password": "broker.cli.importers.onepassword:load_1pux",
    "importer.1password-csv": "broker.cli.importers.onepassword:load_csv",
    "importer.pass": "broker.cli.importers.pass_store:load",
    "importer.browser-csv": "broker.cli.importers.browser_csv:load",
    "importer.env": "broker.cli.importers.envfile:load",
}
BUILTINS: dict[str, str] = {
    **IMPORTERS,
    **{f"entry_type.{t}": f"broker.wire.entries:{t.upper()}" for t in ENTRY_TYPE_NAMES},
}
PLUGIN_TIMEOUT = 10.0  # seconds a plugin may take to load, or to validate one entry
_TYPE_RE = re.compile(ENTRY_TYPE_PATTERN)
_FIELD_RE = re.compile(FIELD_NAME_PATTERN)


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


def _failed(plugin: Plugin, what: str, hint_verb: str = "disable") -> PluginUnavailable:
    return PluginUnavailable(
        f"plugin {plugin.name} ({plugin.dist}) {what}",
        hint=f'the person can {hint_verb} it with "apm plugin {hint_verb} {plugin.name}"',
        data={"plugin": plugin.name, "distribution": plugin.dist, "reason": "failed"},
    )


def load_target(plugin: Plugin) -> Any:
    module, _, attr = plugin.target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except (Exception, SystemExit) as exc:  # a plugin's import may raise anything
        raise _failed(plugin, f"failed to load: {type(exc).__name__}") from exc
    return obj


def not_enabled(plugin: Plugin, what: str) -> PluginUnavailable:
    return PluginUnavailable(
        f"{what} comes from the plugin {plugin.name} ({plugin.dist}), which is not enabled",
        hint=f'the person enables it with "apm plugin enable {plugin.name}"',
        data={"plugin": plugin.name, "distribution": plugin.dist, "reason": "disabled"},
    )


def enabled_names(path: Path | None = None) -> set[str]:
    from broker.plugin_state import read_enabled

    return read_enabled(path)


def _bounded(plugin: Plugin, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a daemon thread, at most PLUGIN_TIMEOUT; anything raised is reported."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # isolate everything, SystemExit included
            box.append((False, exc))

    worker = threading.Thread(target=run, name="apm-plugin", daemon=True)
    worker.start()
    worker.join(PLUGIN_TIMEOUT)
    if not box:
        raise _failed(plugin, f"did not finish {what} within {PLUGIN_TIMEOUT:.0f} s")
    ok, value = box[0]
    if ok:
        return value
    if isinstance(value, ApmError):
        raise value
    raise _failed(plugin, f"failed {what}: {type(value).__name__}") from value


# ---------------------------------------------------------------------- entry types

Validate = Callable[[dict[str, str], dict[str, str]], object]


@dataclass(frozen=True)
class EntryTypePlugin:
    spec: TypeSpec
    plugin: Plugin
    validate: Validate | None


class _Registry:
    """Loaded entry-type plugins (or why not), valid while the enabled list stays the same."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enabled: frozenset[str] | None = None
        self.plugins: dict[str, Plugin] | None = None
        self.types: dict[str, EntryTypePlugin | ApmError] = {}

    def get(self, name: str) -> EntryTypePlugin:
        enabled = frozenset(enabled_names())
        with self.lock:
            if enabled != self.enabled:
                self.enabled, self.plugins, self.types = enabled, None, {}
            hit = self.types.get(name)
            if hit is None:
                try:
                    hit = self._load(name, enabled)
                except ApmError as exc:
                    hit = exc
                self.types[name] = hit
        if isinstance(hit, ApmError):  # a fresh exception each time, the same message
            raise type(hit)(hit.message, hint=hit.hint, data=dict(hit.data))
        return hit

    def _load(self, name: str, enabled: frozenset[str]) -> EntryTypePlugin:
        if self.plugins is None:
            self.plugins = {p.name: p for p in discover() if p.kind == "entry_type"}
        plugin = self.plugins.get(f"entry_type.{name}")
        if plugin is None or not _TYPE_RE.match(name):
            raise InvalidParameters(
                "unknown entry type",
                hint=_TYPES_HINT,
                data={"type": name[:40], "fields": ["type"]},
            )
        if plugin.name not in enabled:
            raise not_enabled(plugin, f"the entry type {name}")
        obj = _bounded(plugin, "loading", load_target, plugin)
        return _as_type(plugin, name, obj)


_REGISTRY = _Registry()
_TYPES_HINT = (
    f"types: {', '.join(ENTRY_TYPE_NAMES)}; enabled entry_type plugins add more (the person "
    'lists them with "apm plugin ls")'
)


def _invalid(plugin: Plugin, why: str) -> PluginUnavailable:
    return PluginUnavailable(
        f"plugin {plugin.name} ({plugin.dist}) does not describe an entry type: {why}",
        hint=f'the person can disable it with "apm plugin disable {plugin.name}"',
        data={"plugin": plugin.name, "distribution": plugin.dist, "reason": "invalid"},
    )


def _as_type(plugin: Plugin, name: str, obj: Any) -> EntryTypePlugin:
    if isinstance(obj, TypeSpec):
        obj = {"fields": [f.model_dump() for f in obj.fields], "primary": obj.primary}
    if not isinstance(obj, Mapping):
        raise _invalid(plugin, f"it is a {type(obj).__name__}, not a mapping")
    raw = obj.get("fields")
    if not isinstance(raw, list | tuple) or not raw:
        raise _invalid(plugin, '"fields" must be a non-empty list')
    fields: list[FieldSpec] = []
    for f in raw:
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
            raise _invalid(plugin, 'each field must be a mapping with a "name"')
        if not _FIELD_RE.match(f["name"]) or f["name"] in {x.name for x in fields}:
            raise _invalid(plugin, "field names must be unique and look like a_field-1.x")
        fields.append(
            FieldSpec(
                name=f["name"],
                secret=bool(f.get("secret")),
                required=bool(f.get("required")),
                multiline=bool(f.get("multiline")),
            )
        )
    primary = obj.get("primary", next((f.name for f in fields if f.secret), None))
    if primary is not None and primary not in {f.name for f in fields}:
        raise _invalid(plugin, '"primary" names no field')
    validate = obj.get("validate")
    if validate is not None and not callable(validate):
        raise _invalid(plugin, '"validate" is not callable')
    spec = TypeSpec(name=name, fields=tuple(fields), primary=primary)
    return EntryTypePlugin(spec, plugin, validate)


def entry_type(name: str) -> TypeSpec:
    """The type's spec, built-in or from an enabled plugin; else a clear error naming why."""
    spec = ENTRY_TYPES.get(name)
    if spec is not None:
        return spec
    return _REGISTRY.get(name).spec


def check_type_filter(name: str, stored: Iterable[str]) -> None:
    """A listing's type filter: a built-in type, a plugin's (enabled or not), or one the vault
    still holds (its plugin uninstalled); anything else is a mistake worth saying."""
    if name in ENTRY_TYPES or any(p.name == f"entry_type.{name}" for p in discover()):
        return
    if name in stored:
        return
    raise InvalidParameters(
        "unknown entry type in the type filter",
        hint=_TYPES_HINT,
        data={"field": "type", "type": name[:40], "fields": ["type"]},
    )


def entry_type_or_none(name: str) -> TypeSpec | None:
    """For reading an entry that exists: its spec, or None when its plugin is unavailable."""
    try:
        return entry_type(name)
    except ApmError:
        return None


def _scrub(text: str, secrets: dict[str, str]) -> str:
    for value in sorted(secrets.values(), key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return "".join(c if c.isprintable() else " " for c in text)[:200]


def _call_validate(fn: Validate, fields: dict[str, str], secrets: dict[str, str]) -> str | None:
    try:
        fn(dict(fields), dict(secrets))
    except ValueError as exc:
        return str(exc) or "invalid value"
    return None


def check_values(type_name: str, fields: dict[str, str], secrets: dict[str, str]) -> None:
    """Run a plugin type's own validation (built-ins are checked by the vault itself)."""
    if type_name in ENTRY_TYPES:
        return
    loaded = _REGISTRY.get(type_name)
    if loaded.validate is None:
        return
    reason = _bounded(loaded.plugin, "validating", _call_validate, loaded.validate, fields, secrets)
    if reason is not None:
        raise InvalidParameters(
            f"the {type_name} entry type refused the values: {_scrub(reason, secrets)}",
            data={"plugin": loaded.plugin.name, "type": type_name},
        )
