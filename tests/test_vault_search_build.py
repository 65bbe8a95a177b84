"""Search while the search index is still being built after an unlock.

Unlock starts building the index in a thread (`build_search_index_in_background`); searches and
commits do not wait for it. These tests hold that thread inside the index build (so its copy of
the entries is the one taken at unlock) while the vault is searched and changed, and check every
search against a plain loop over the current entries: before the index exists, and once the
late index, older than the commits, is installed.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core import vault as vault_module
from broker.core.crypto import KdfParams, normalize_password
from broker.core.vault import Change, Vault, _score
from broker.server.peer import Peer

from .twin import broker_state, wire

FAST = KdfParams("test", 8 * 1024, 1, 1)
PASSWORD = "correct horse battery staple"
NO_CHANGE = Change(fields={}, secrets={}, remove_fields=[])


def _full_scan(vault: Vault, query: str) -> list[tuple[str, float]]:
    """The search as a plain loop over the current entries: what any search must return."""
    q = query.casefold().strip()
    hits = [(e, _score(e, q)) for e in vault.entries.values()]
    ranked = sorted((h for h in hits if h[1] > 0), key=lambda h: (-h[1], h[0].name.casefold()))
    return [(e.id, s) for e, s in ranked]


def _search(vault: Vault, query: str) -> list[tuple[str, float]]:
    return [(e.id, s) for e, s in vault.search(query, limit=10_000)]


def _add(vault: Vault, name: str, **kw: Any) -> None:
    change = Change(
        fields={"username": f"{name}@example.com"}, secrets={"password": "pw"}, remove_fields=[]
    )
    vault.add("login", name, "default", kw.get("tags", []), kw.get("url"), None, change)


class _Held:
    """Makes the unlock's index-building thread (and only it) wait inside `_SearchIndex`
    until released; `entered` is set once it is there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = vault_module._SearchIndex
        held = self

        class Index(real):  # type: ignore[misc,valid-type]
            def __init__(self, entries: list[Any]) -> None:
                if threading.current_thread().name == "search-index":
                    held.entered.set()
                    assert held.release.wait(60), "the test never released the index build"
                super().__init__(entries)

        monkeypatch.setattr(vault_module, "_SearchIndex", Index)

    def builder(self) -> threading.Thread:
        assert self.entered.wait(60), "unlock started no index build"
        return next(t for t in threading.enumerate() if t.name == "search-index")


QUERIES = ("alpha", "beta", "gamma", "delta", "alp", "aa", "example.com", "tag-x", "zz", "a*")


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "vault.apm"
    v = Vault.create(p, normalize_password(PASSWORD), FAST)
    try:
        for i in range(300):
            _add(v, f"alpha-{i:03d}", tags=["tag-x"] if i % 7 == 0 else [])
        for i in range(200):
            _add(v, f"beta-{i:03d}", url=f"https://beta{i}.example.com")
    finally:
        v.close()
    yield p


def test_searches_during_the_index_build_find_exactly_the_current_entries(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _Held(monkeypatch)
    vault = Vault.open(path, normalize_password(PASSWORD))
    try:
        builder = held.builder()  # building, from the entries as unlocked
        for q in QUERIES:
            assert _search(vault, q) == _full_scan(vault, q), q
        _add(vault, "gamma-new")
        vault.remove(vault.resolve("alpha-001"))
        assert _search(vault, "gamma") == _full_scan(vault, "gamma") != []
        assert _search(vault, "alpha") == _full_scan(vault, "alpha")
        held.release.set()
        builder.join(60)
        assert not builder.is_alive()
        for q in QUERIES:
            assert _search(vault, q) == _full_scan(vault, q), q
    finally:
        held.release.set()
        vault.close()


def test_an_index_built_from_the_unlocked_entries_and_installed_after_commits_is_not_stale(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No search before the late index lands: it is the only index, older than every commit
    made meanwhile (renames, removals, adds), and searches must still see the current ones."""
    held = _Held(monkeypatch)
    vault = Vault.open(path, normalize_password(PASSWORD))
    try:
        builder = held.builder()
        for i in range(0, 300, 3):
            vault.remove(vault.resolve(f"alpha-{i:03d}"))
        for i in range(1, 40, 3):
            vault.edit(
                vault.resolve(f"alpha-{i:03d}"),
                new_name=f"delta-{i:03d}",
                move_to=None,
                add_tags=["tag-x"],
                remove_tags=[],
                url=None,
                notes=None,
                change=NO_CHANGE,
            )
        for i in range(30):
            _add(vault, f"gamma-{i:03d}")
        held.release.set()
        builder.join(60)
        assert not builder.is_alive()
        assert vault._search is not None  # the late index is the one searches use
        for q in QUERIES:
            assert _search(vault, q) == _full_scan(vault, q), q
        assert {e.name for e, _ in vault.search("delta", limit=1000)} == {
            f"delta-{i:03d}" for i in range(1, 40, 3)
        }
    finally:
        held.release.set()
        vault.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_broker_starts_the_index_build_only_after_the_unlock_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's unlock opens the vault without starting the build (a thread whose CPU would
    delay the reply's remaining steps) and starts it in the loop step after the reply."""
    started: list[Vault] = []
    monkeypatch.setattr(Vault, "build_search_index_in_background", lambda v: started.append(v))
    peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    with broker_state(tmp_path, PASSWORD, seed=lambda v: _add(v, "alpha-1")) as state:
        state.cache.lock()
        got = await wire(state, peer, "vault.unlock", password=PASSWORD)
        assert got.ok, got.error
        assert started == []  # neither inside the open nor before the reply was produced
        await asyncio.sleep(0)
        assert started == [state.cache.get()]
        assert [e.name for e, _ in state.cache.get().search("alpha")] == ["alpha-1"]
