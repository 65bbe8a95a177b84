"""The search index (entries in name order, searches that stop after `limit` hits) against a
plain loop over the current entries: after commits that add, rename, move, retag and remove
entries once the index exists, with every filter a search takes, and with a session's entry
filter (`visible`) hiding entries. The loop is what any search must return, in that order.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.core import vault as vault_module
from broker.core.crypto import KdfParams, normalize_password
from broker.core.vault import StoredEntry, StoredField, Vault, _score

FAST = KdfParams("test", 8 * 1024, 1, 1)
PASSWORD = "correct horse battery staple"
SPACES = ("default", "work", "personal")
TAGS = ("dev", "ops", "secret")

Visible = Callable[[StoredEntry], bool]


def _full_scan(
    vault: Vault,
    query: str,
    space: str | None,
    tag: str | None,
    limit: int,
    visible: Visible | None,
) -> list[tuple[str, float]]:
    q = query.casefold().strip()
    hits = [
        (e, _score(e, q))
        for e in vault.entries.values()
        if (space is None or e.space == space)
        and (tag is None or tag in e.tags)
        and (visible is None or visible(e))
    ]
    ranked = sorted((h for h in hits if h[1] > 0), key=lambda h: (-h[1], h[0].name.casefold()))
    return [(e.id, s) for e, s in ranked][:limit]


def _search(
    vault: Vault,
    query: str,
    space: str | None,
    tag: str | None,
    limit: int,
    visible: Visible | None,
) -> list[tuple[str, float]]:
    return [(e.id, s) for e, s in vault.search(query, space, None, tag, limit, visible)]


def _entry(i: int, name: str, space: str, user: str, notes: str, tags: list[str]) -> StoredEntry:
    now = datetime.now(UTC)
    return StoredEntry(
        id=f"e{i}",
        name=name,
        type="login",
        space=space,
        tags=tags,
        url=None,
        notes=notes or None,
        fields={"username": StoredField(secret=False, value=user or None)},
        created_at=now,
        updated_at=now,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault.apm"


_texts = st.text(alphabet="abcAB-ß.İ ", max_size=8)
_names = _texts.map(str.strip).filter(bool)
_rows = st.tuples(
    _names, st.sampled_from(SPACES), _texts, _texts, st.lists(st.sampled_from(TAGS), max_size=2)
)
_ops = st.one_of(
    st.tuples(st.just("add"), _rows),
    st.tuples(st.just("rename"), st.integers(0, 50), _names),
    st.tuples(st.just("move"), st.integers(0, 50), st.sampled_from(SPACES)),
    st.tuples(st.just("retag"), st.integers(0, 50), st.lists(st.sampled_from(TAGS), max_size=2)),
    st.tuples(st.just("remove"), st.integers(0, 50)),
)
# a session's entry filter, as broker.core.sessions.EntryFilter decides it: by space, by tag,
# or by a case-insensitive glob on the name
_visibles: dict[str, Visible | None] = {
    "none": None,
    "spaces work": lambda e: e.space == "work",
    "tag dev": lambda e: "dev" in e.tags,
    "names a*": lambda e: fnmatch.fnmatchcase(e.name.casefold(), "a*"),
    "hides all": lambda e: False,
}


@settings(max_examples=100, deadline=None)
@example(  # a removal, a rename and a move after the build, each under a filter
    rows=[
        ("abc", "work", "", "", ["dev"]),
        ("abd", "work", "", "", []),
        ("b", "default", "", "", []),
    ],
    ops=[("remove", 0), ("rename", 0, "zab"), ("move", 1, "work")],
    query="ab",
    space=None,
    tag=None,
    limit=1000,
    visible="spaces work",
    chunk=1,
    build_slice=2,
)
@given(
    rows=st.lists(_rows, max_size=14),
    ops=st.lists(_ops, max_size=6),
    # short queries over few letters match often, so stale copies would show
    query=st.one_of(
        st.text(alphabet="abAB", min_size=1, max_size=2),
        st.text(alphabet="abcAB-ß.İ *", min_size=1, max_size=4),
    ),
    space=st.sampled_from([None, *SPACES]),
    tag=st.sampled_from([None, *TAGS]),
    limit=st.sampled_from([1, 2, 5, 1000]),
    visible=st.sampled_from(sorted(_visibles)),
    chunk=st.sampled_from([1, 3, 1 << 16]),
    build_slice=st.sampled_from([1, 2, 5, 2048]),
)
def test_a_search_after_commits_finds_exactly_what_a_full_scan_finds(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[str, str, str, str, list[str]]],
    ops: list[tuple[object, ...]],
    query: str,
    space: str | None,
    tag: str | None,
    limit: int,
    visible: str,
    chunk: int,
    build_slice: int,
) -> None:
    path = tmp_path_factory.mktemp("idx") / "vault.apm"
    vault = Vault.create(path, normalize_password(PASSWORD), FAST, format=1)  # fast to create
    see = _visibles[visible]
    try:
        with vault.mutation():
            vault.spaces = list(SPACES)
            for i, row in enumerate(rows):
                e = _entry(i, *row)
                vault.entries[e.id] = e
            vault._reindex()
        # chunk: the index scans its text in chunks, build_slice: it is built in slices (so
        # neither holds the GIL for long); 1 puts a boundary at every entry
        with (
            mock.patch.object(vault_module, "_SCAN_CHUNK", chunk),
            mock.patch.object(vault_module, "_BUILD_SLICE", build_slice),
        ):
            vault.build_search_index()
            assert vault._search is not None
            # commits after the build: the index keeps its old copies, marked stale
            n = len(rows)
            for op in ops:
                ids = list(vault.entries)
                with vault.mutation():
                    if op[0] == "add":
                        e = _entry(n, *op[1])  # type: ignore[misc]
                        n += 1
                        vault.entries[e.id] = e
                    elif ids:
                        old = vault.entries[ids[op[1] % len(ids)]]  # type: ignore[operator]
                        if op[0] == "remove":
                            del vault.entries[old.id]
                        else:
                            field = {"rename": "name", "move": "space", "retag": "tags"}[op[0]]
                            new = old.model_copy(update={field: op[2]})
                            vault.entries[old.id] = new
            assert vault._search is not None  # a few commits do not drop the index
            got = _search(vault, query, space, tag, limit, see)
        want = _full_scan(vault, query, space, tag, limit, see)
        assert [s for _, s in got] == [s for _, s in want]
        by_id = vault.entries
        assert [by_id[i].name.casefold() for i, _ in got] == [
            by_id[i].name.casefold() for i, _ in want
        ]
        # namesakes with one score may come in another order, but the hits are the same ones
        # unless the limit cut a run of namesakes (then which of them made it may differ)
        if len(want) < limit:
            assert sorted(got) == sorted(want)
        if see is not None:
            assert all(see(by_id[i]) for i, _ in got)
    finally:
        vault.close()


@pytest.mark.parametrize("build_slice", [1, 2, 3, 2048])
def test_the_index_holds_the_entries_in_name_order_and_finds_prefix_runs_by_bisection(
    path: Path, build_slice: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vault_module, "_BUILD_SLICE", build_slice)  # slices sorted, merged
    vault = Vault.create(path, normalize_password(PASSWORD), FAST, format=1)
    try:
        with vault.mutation():
            for i, name in enumerate(["gitlab", "Git", "agit", "GITHUB", "gi", "git", "zeta"]):
                e = _entry(i, name, "default", "", "", [])
                vault.entries[e.id] = e
            vault._reindex()
        vault.build_search_index()
        index = vault._search
        assert index is not None
        names = [index.name_at(i) for i in range(len(index.entries))]
        assert names == ["agit", "gi", "git", "git", "github", "gitlab", "zeta"]
        # equal names keep the vault's order ("Git" was added before "git")
        assert [index.entries[i].name for i in (2, 3)] == ["Git", "git"]
        assert index.prefixed("git") == (2, 6)
        assert index.prefixed("gi") == (1, 6)
        assert index.prefixed("h") == (6, 6)
        assert index.prefixed("zz") == (7, 7)
        assert index.names == "\x00".join(names)
        assert [index.hay_at(i) for i in range(7)] == ["\x00"] * 7  # no url, no notes
        ranked = list(index.ranked("git"))
        assert ranked == [(100.0, 2), (100.0, 3), (80.0, 4), (80.0, 5), (60.0, 0)]
    finally:
        vault.close()


def test_a_search_stops_reading_candidates_once_it_has_limit_hits(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = Vault.create(path, normalize_password(PASSWORD), FAST, format=1)
    try:
        with vault.mutation():
            for i in range(2000):
                e = _entry(i, f"svc-{i:04d}", "default", f"svc{i}@example.com", "", [])
                vault.entries[e.id] = e
            vault._reindex()
        vault.build_search_index()
        index = vault._search
        assert index is not None
        read = [0]
        real = type(index).ranked

        def counting(self: object, q: str) -> Iterator[tuple[float, int]]:
            for item in real(self, q):  # type: ignore[arg-type]
                read[0] += 1
                yield item

        monkeypatch.setattr(type(index), "ranked", counting)
        hits = vault.search("svc", limit=10)
        assert [e.name for e, _ in hits] == [f"svc-{i:04d}" for i in range(10)]
        assert read[0] == 10  # not the 2000 names that start with "svc", nor their user names
        # a filter that hides most entries reads on until it has its ten
        hits = vault.search("svc", limit=10, visible=lambda e: e.name.endswith("7"))
        assert [e.name for e, _ in hits] == [f"svc-{i:04d}" for i in range(7, 100, 10)]
    finally:
        vault.close()


def test_an_index_built_from_entries_older_than_a_rolled_back_commit_is_not_installed(
    path: Path,
) -> None:
    # A build in flight (at unlock, or by a search) copies the entries first; a commit that
    # fails and rolls back resets the index bookkeeping. The late index must not then be
    # installed as current: it would hide the commits made since its copy.
    vault = Vault.create(path, normalize_password(PASSWORD), FAST, format=1)
    try:
        with vault.mutation():
            for i, name in enumerate(["alpha", "alpine", "beta"]):
                e = _entry(i, name, "default", "", "", [])
                vault.entries[e.id] = e
            vault._reindex()
        in_flight = vault.search_snapshot()  # no index yet: this one will build it
        assert in_flight.index is None
        with vault.mutation():
            del vault.entries["e0"]  # alpha
        with pytest.raises(RuntimeError), vault.mutation():
            vault.entries["e2"] = vault.entries["e2"].model_copy(update={"name": "alps"})
            raise RuntimeError("the commit fails")
        in_flight.ensure_index()  # the late build finishes
        assert [e.name for e, _ in vault.search("al")] == ["alpine"]
        assert [e.name for e, _ in vault.search("alp")] == ["alpine"]
    finally:
        vault.close()
