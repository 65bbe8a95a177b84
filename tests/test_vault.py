"""The vault domain: entries, names, spaces, sealed secrets, history, search, rollback."""

from __future__ import annotations

import base64
import errno
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import vault as vault_module
from broker.core import vault_db
from broker.core.crypto import KdfParams, normalize_password
from broker.core.vault import (
    HISTORY_MAX,
    Change,
    Payload,
    StoredEntry,
    StoredField,
    Vault,
    _score,
)
from broker.wire.entries import ENTRY_TYPES
from broker.wire.errors import ApmError

from .conftest import PASSWORD

FAST = KdfParams("test", 8 * 1024, 1, 1)
SEED = "JBSWY3DPEHPK3PXP"
LOGIN_PASSWORD = "pw-value"


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(ApmError) as info:
        fn()
    return info.value.code


def change(
    fields: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
    remove: list[str] | None = None,
) -> Change:
    return Change(fields=fields or {}, secrets=secrets or {}, remove_fields=remove or [])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault.apm"


@pytest.fixture(params=[2, 1], ids=["v2", "v1"])
def vault(path: Path, request: pytest.FixtureRequest) -> Iterator[Vault]:
    """Each test runs on both formats: v2 (SQLite) and v1 (kept open without migrating)."""
    v = Vault.create(path, normalize_password(PASSWORD), FAST, format=request.param)
    yield v
    v.close()


def on_disk(path: Path) -> object:
    """What the vault file holds: its bytes (v1) or its rows (v2)."""
    if not vault_db.is_v2(path):
        return path.read_bytes()
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM records ORDER BY kind, id").fetchall()
    finally:
        conn.close()


class FailingCommit:
    """A stand-in for the v2 vault's SQLite connection whose COMMIT hits a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)

    def execute(self, sql: str, *args: object) -> object:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)


def reopen(path: Path) -> Vault:
    return Vault.open(path, normalize_password(PASSWORD))


def login(
    vault: Vault,
    name: str,
    *,
    space: str = "default",
    password: str = LOGIN_PASSWORD,
    username: str | None = None,
    url: str | None = None,
    notes: str | None = None,
    tags: list[str] | None = None,
) -> StoredEntry:
    fields = {"username": username} if username else {}
    return vault.add(
        "login",
        name,
        space,
        tags or [],
        url,
        notes,
        change(fields, {"password": password}),
    )


def state(vault: Vault) -> tuple[dict[str, StoredEntry], list[str]]:
    return dict(vault.entries), list(vault.spaces)


# ---------------------------------------------------------------------- names and lookups


def test_an_entry_resolves_by_id_and_by_name_in_any_case(vault: Vault) -> None:
    entry = login(vault, "GitHub")
    assert vault.resolve(entry.id) == entry
    assert vault.resolve("github") == entry
    assert vault.resolve("GITHUB") == entry
    assert vault.resolve("github", "default") == entry


def test_an_unknown_name_or_id_is_entry_not_found(vault: Vault) -> None:
    entry = login(vault, "github")
    vault.space_add("work")
    assert code_of(lambda: vault.resolve("gitlab")) == "ENTRY_NOT_FOUND"
    assert code_of(lambda: vault.resolve("github", "work")) == "ENTRY_NOT_FOUND"
    assert code_of(lambda: vault.resolve(entry.id, "work")) == "ENTRY_NOT_FOUND"


@pytest.mark.parametrize("duplicate", ["github", "GitHub", "  github  "])
def test_a_name_is_unique_within_a_space_ignoring_case(vault: Vault, duplicate: str) -> None:
    login(vault, "github")
    before = state(vault)
    assert code_of(lambda: login(vault, duplicate)) == "ALREADY_EXISTS"
    assert state(vault) == before


def test_the_same_name_in_two_spaces_is_ambiguous_without_a_space(vault: Vault) -> None:
    vault.space_add("work")
    home_db = login(vault, "db")
    work_db = login(vault, "DB", space="work")
    assert code_of(lambda: vault.resolve("db")) == "AMBIGUOUS_ENTRY"
    assert vault.resolve("db", "work") == work_db
    assert vault.resolve("db", "default") == home_db
    assert vault.resolve(work_db.id) == work_db


def test_a_name_resolves_as_entries_of_that_name_come_and_go_in_several_spaces(
    vault: Vault, path: Path
) -> None:
    """The name index keeps one id per name and a list only for a name in several spaces:
    every transition between the two, by add, rename, move and removal, and after reopening."""
    vault.space_add("work")
    vault.space_add("ops")
    a = login(vault, "db")
    b = login(vault, "DB", space="work")
    c = login(vault, "Db", space="ops")
    assert code_of(lambda: vault.resolve("db")) == "AMBIGUOUS_ENTRY"
    vault.remove(b)
    assert code_of(lambda: vault.resolve("dB")) == "AMBIGUOUS_ENTRY"  # still two
    vault.remove(c)
    assert vault.resolve("DB") == a  # back to one
    edit = dict(add_tags=[], remove_tags=[], url=None, notes=None, change=change())
    a = vault.edit(a, new_name="other", move_to=None, **edit)
    assert code_of(lambda: vault.resolve("db")) == "ENTRY_NOT_FOUND"
    assert vault.resolve("OTHER") == a
    d = login(vault, "other", space="work")
    assert code_of(lambda: vault.resolve("other")) == "AMBIGUOUS_ENTRY"
    d = vault.edit(d, new_name=None, move_to="ops", **edit)  # moved: same name, other space
    assert code_of(lambda: vault.resolve("other")) == "AMBIGUOUS_ENTRY"
    a = vault.edit(a, new_name="db", move_to=None, **edit)
    assert vault.resolve("other") == d and vault.resolve("db") == a
    if vault.format == 2:
        login(vault, "DB", space="work")
        vault.close()
        v = Vault.open(path, normalize_password(PASSWORD))
        try:
            assert code_of(lambda: v.resolve("db")) == "AMBIGUOUS_ENTRY"
            assert v.resolve("other").id == d.id
        finally:
            v.close()


def test_adding_to_a_missing_space_is_space_not_found(vault: Vault) -> None:
    assert code_of(lambda: login(vault, "github", space="nowhere")) == "SPACE_NOT_FOUND"
    assert vault.entries == {}


def test_renaming_onto_another_entrys_name_is_refused_but_a_case_change_is_not(
    vault: Vault,
) -> None:
    github = login(vault, "github")
    login(vault, "gitlab")
    edit = dict(move_to=None, add_tags=[], remove_tags=[], url=None, notes=None, change=change())
    assert code_of(lambda: vault.edit(github, new_name="GitLab", **edit)) == "ALREADY_EXISTS"
    renamed = vault.edit(github, new_name="GitHub", **edit)
    assert vault.resolve("github").name == renamed.name == "GitHub"


# ---------------------------------------------------------------------- sealed secrets


def test_secret_values_stay_sealed_in_memory_until_revealed(vault: Vault) -> None:
    entry = login(vault, "github", username="alice", password="hunter2-very-secret")
    for dump in (
        entry.model_dump_json(),
        repr(entry),
        entry.meta().model_dump_json(),
        repr(vault.entries),
    ):
        assert "hunter2-very-secret" not in dump
        assert base64.b64encode(b"hunter2-very-secret").decode() not in dump
    assert "alice" in entry.model_dump_json()  # plain fields are metadata
    assert vault.reveal(entry, None) == ("password", "hunter2-very-secret")
    assert vault.reveal(entry, "username") == ("username", "alice")


def test_a_sealed_value_moved_to_another_entry_fails_to_open(vault: Vault) -> None:
    donor = login(vault, "github", password="donor-secret")
    target = login(vault, "gitlab", password="target-secret")
    forged = target.model_copy(update={"fields": dict(donor.fields)})
    assert vault.reveal(donor, "password")[1] == "donor-secret"
    assert code_of(lambda: vault.reveal(forged, "password")) == "VAULT_CORRUPT"


def test_a_sealed_value_moved_to_another_field_fails_to_open(vault: Vault) -> None:
    entry = vault.add(
        "custom", "svc", "default", [], None, None, change(secrets={"one": "1st", "two": "2nd"})
    )
    swapped = entry.model_copy(
        update={"fields": {"one": entry.fields["two"], "two": entry.fields["one"]}}
    )
    assert vault.reveal(entry, "two")[1] == "2nd"
    assert code_of(lambda: vault.reveal(swapped, "one")) == "VAULT_CORRUPT"
    assert code_of(lambda: vault.reveal(swapped, "two")) == "VAULT_CORRUPT"


def test_revealing_a_field_the_entry_lacks_is_entry_not_found(vault: Vault) -> None:
    entry = login(vault, "github")
    assert code_of(lambda: vault.reveal(entry, "pin")) == "ENTRY_NOT_FOUND"


# ---------------------------------------------------------------------- field validation


def test_a_secret_field_given_as_a_plain_value_is_refused(vault: Vault) -> None:
    err_code = code_of(
        lambda: vault.add(
            "login", "github", "default", [], None, None, change({"password": "oops"})
        )
    )
    assert err_code == "INVALID_PARAMETERS"
    assert vault.entries == {}


def test_a_missing_required_field_is_refused_and_named(vault: Vault) -> None:
    with pytest.raises(ApmError) as info:
        vault.add("login", "github", "default", [], None, None, change({"username": "alice"}))
    assert info.value.code == "INVALID_PARAMETERS"
    # the params path it belongs in (a tool names its argument), and the entry's field
    assert info.value.data["fields"] == ["secrets.password"]
    assert info.value.data["missing"] == ["password"]
    assert vault.entries == {}


@pytest.mark.parametrize(
    "bad",
    [
        change({"colour": "blue"}, {"password": "x"}),  # not a login field
        change({"bad name": "x"}, {"password": "x"}),  # not a valid field name
    ],
    ids=["unknown-field", "invalid-field-name"],
)
def test_a_field_the_type_does_not_have_is_refused(vault: Vault, bad: Change) -> None:
    assert code_of(lambda: vault.add("login", "x", "default", [], None, None, bad)) == (
        "INVALID_PARAMETERS"
    )


def test_a_field_given_both_plain_and_secret_is_refused(vault: Vault) -> None:
    both = change({"token": "a"}, {"token": "b"})
    assert code_of(lambda: vault.add("custom", "x", "default", [], None, None, both)) == (
        "INVALID_PARAMETERS"
    )


def test_a_blank_name_is_refused(vault: Vault) -> None:
    assert code_of(lambda: login(vault, "   ")) == "INVALID_PARAMETERS"
    assert code_of(lambda: login(vault, "a\nb")) == "INVALID_PARAMETERS"


# ---------------------------------------------------------------------- history


def test_secret_history_keeps_only_the_most_recent_values(vault: Vault) -> None:
    entry = login(vault, "github", password="v0")
    rotations = HISTORY_MAX + 5
    for i in range(1, rotations + 1):
        entry = vault.edit(
            entry,
            new_name=None,
            move_to=None,
            add_tags=[],
            remove_tags=[],
            url=None,
            notes=None,
            change=change(secrets={"password": f"v{i}"}),
        )
    history = entry.fields["password"].history
    assert len(history) == HISTORY_MAX
    assert entry.meta().fields["password"].history == HISTORY_MAX
    assert vault.reveal(entry, "password")[1] == f"v{rotations}"
    opened = [vault._open(entry.id, "password", item.sealed) for item in history]
    assert opened == [f"v{i}" for i in range(rotations - 1, rotations - 1 - HISTORY_MAX, -1)]
    assert len(reopen(vault.path).resolve("github").fields["password"].history) == HISTORY_MAX


# ---------------------------------------------------------------------- search


@pytest.fixture
def searchable(vault: Vault) -> Vault:
    login(vault, "git")  # exact
    login(vault, "GitHub")  # prefix
    login(vault, "legit-tool")  # substring
    login(vault, "bitbucket", url="https://git.example.com")  # other field: url
    login(vault, "forge", username="gitster")  # other field: username
    login(vault, "wiki", notes="see the git handbook")  # other field: notes
    login(vault, "ci", tags=["git"])  # other field: tag
    login(vault, "grid-tiles")  # subsequence g..i..t
    login(vault, "unrelated", password="git-git-git")  # matches only in a secret
    vault.add(
        "custom", "nothing", "default", [], None, None, change(secrets={"note": "git"})
    )  # only in a secret of a free-form entry
    return vault


def test_search_ranks_exact_then_prefix_then_substring_then_other_fields_then_subsequence(
    searchable: Vault,
) -> None:
    hits = searchable.search("GIT")
    assert [e.name for e, _ in hits] == [
        "git",
        "GitHub",
        "legit-tool",
        "bitbucket",
        "ci",
        "forge",
        "wiki",
        "grid-tiles",
    ]
    tiers = [score for _, score in hits]
    assert tiers[0] > tiers[1] > tiers[2] > tiers[3] == tiers[6] > tiers[7] > 0


def test_search_never_matches_secret_values(searchable: Vault) -> None:
    assert searchable.search("git-git-git") == []
    assert searchable.search(LOGIN_PASSWORD) == []
    searchable.add("totp", "mfa", "default", [], None, None, change(secrets={"secret": SEED}))
    assert searchable.search(SEED.lower()) == []


def test_search_honours_space_type_and_limit_filters(searchable: Vault) -> None:
    searchable.space_add("work")
    login(searchable, "git", space="work")
    assert [e.space for e, _ in searchable.search("git", space="work")] == ["work"]
    assert searchable.search("git", type_="custom") == []
    assert len(searchable.search("git", limit=2)) == 2


def _full_scan(vault: Vault, query: str) -> list[tuple[str, float]]:
    """The search as a plain loop over every entry: what the index must reproduce."""
    q = query.casefold().strip()
    hits = [(e, _score(e, q)) for e in vault.entries.values()]
    ranked = sorted((h for h in hits if h[1] > 0), key=lambda h: (-h[1], h[0].name.casefold()))
    return [(e.id, score) for e, score in ranked]


_texts = st.text(alphabet="abcAB-ß.İ ", max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            _texts.filter(lambda n: n.strip() != ""), _texts, _texts, st.lists(_texts, max_size=2)
        ),
        max_size=12,
    ),
    st.text(alphabet="abcAB-ß.İ *", min_size=1, max_size=4),
    st.sampled_from([1, 3, 1 << 16]),
)
def test_search_through_the_index_finds_exactly_what_a_full_scan_finds(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[str, str, str, list[str]]],
    query: str,
    chunk: int,
) -> None:
    # chunk: the index scans its text in chunks (so a search never holds the GIL for long);
    # 1 puts a chunk boundary at every entry, and a match must never be lost or split there
    path = tmp_path_factory.mktemp("idx") / "vault.apm"
    vault = Vault.create(path, normalize_password(PASSWORD), FAST, format=1)  # fast to create
    try:
        now = datetime.now(UTC)
        for i, (name, user, notes, tags) in enumerate(rows):
            e = StoredEntry(
                id=f"e{i}",
                name=name.strip(),
                type="login",
                space="default",
                tags=tags,
                url=None,
                notes=notes or None,
                fields={"username": StoredField(secret=False, value=user or None)},
                created_at=now,
                updated_at=now,
            )
            vault.entries[e.id] = e
        with mock.patch.object(vault_module, "_SCAN_CHUNK", chunk):
            vault.build_search_index()
        got = [(e.id, score) for e, score in vault.search(query, limit=1000)]
        assert got == _full_scan(vault, query)
        # a small limit may skip the subsequence pass: the top results must not change
        top = [(e.id, score) for e, score in vault.search(query, limit=2)]
        assert top == _full_scan(vault, query)[:2]
    finally:
        vault.close()


def test_search_sees_every_add_rename_and_removal_made_after_an_earlier_search(
    searchable: Vault,
) -> None:
    assert [e.name for e, _ in searchable.search("zebra")] == []
    zebra = login(searchable, "zebra-crossing")
    assert [e.name for e, _ in searchable.search("zebra")] == ["zebra-crossing"]
    searchable.edit(
        zebra,
        new_name="okapi",
        move_to=None,
        add_tags=[],
        remove_tags=[],
        url=None,
        notes=None,
        change=change(),
    )
    assert searchable.search("zebra") == []
    assert [e.name for e, _ in searchable.search("okapi")] == ["okapi"]
    searchable.remove(searchable.resolve("okapi"))
    assert searchable.search("okapi") == []


# ---------------------------------------------------------------------- saving


def test_the_saved_payload_is_the_payload_model_after_every_kind_of_change(
    vault: Vault, path: Path
) -> None:
    """Saves reuse each unchanged entry's JSON: the result must still be exactly `Payload`."""

    def expected() -> object:
        entries = list(vault.entries.values())
        model = Payload(spaces=vault.spaces, entries=entries, extra=vault.extra)
        return json.loads(model.model_dump_json(by_alias=True))

    a = login(vault, "alpha", username="ann")
    login(vault, "beta", tags=["x"])
    assert json.loads(vault.payload_json()) == expected()
    vault.edit(
        a,
        new_name="alpha2",
        move_to=None,
        add_tags=["y"],
        remove_tags=[],
        url="https://a.example",
        notes=None,
        change=change(secrets={"password": "rotated-1"}),
    )
    assert json.loads(vault.payload_json()) == expected()
    vault.space_add("work")
    vault.space_rename("default", "home")
    vault.extra["sessions"] = [{"accessor": "ses_1", "n": 1}]
    assert json.loads(vault.payload_json()) == expected()
    vault.remove(vault.resolve("beta"))
    assert json.loads(vault.payload_json()) == expected()
    vault.save()
    again = reopen(path)
    try:
        assert json.loads(again.payload_json()) == expected()
        assert again.reveal(again.resolve("alpha2"), "password")[1] == "rotated-1"
    finally:
        again.close()


# ---------------------------------------------------------------------- spaces


def test_spaces_can_be_added_renamed_and_removed(vault: Vault, path: Path) -> None:
    vault.space_add("work")
    entry = login(vault, "db", space="work")
    assert code_of(lambda: vault.space_add("work")) == "ALREADY_EXISTS"

    assert vault.space_rename("work", "job") == 1
    assert vault.spaces == ["default", "job"]
    assert vault.resolve("db", "job").id == entry.id
    assert code_of(lambda: vault.resolve("db", "work")) == "ENTRY_NOT_FOUND"
    assert code_of(lambda: vault.space_rename("job", "default")) == "ALREADY_EXISTS"
    assert code_of(lambda: vault.space_rename("work", "x")) == "SPACE_NOT_FOUND"

    vault.space_add("empty")
    assert vault.space_remove("empty", force=False) == 0
    assert reopen(path).spaces == ["default", "job"]


def test_removing_a_non_empty_space_needs_force(vault: Vault, path: Path) -> None:
    vault.space_add("work")
    login(vault, "db", space="work")
    login(vault, "api", space="work")
    keep = login(vault, "mail")
    before = state(vault)

    with pytest.raises(ApmError) as info:
        vault.space_remove("work", force=False)
    assert info.value.code == "SPACE_NOT_EMPTY"
    assert state(vault) == before

    assert vault.space_remove("work", force=True) == 2
    assert vault.spaces == ["default"]
    assert list(vault.entries) == [keep.id]
    assert code_of(lambda: vault.space_remove("work", force=True)) == "SPACE_NOT_FOUND"
    assert list(reopen(path).entries) == [keep.id]


# ---------------------------------------------------------------------- every entry type

PLAIN_VALUES = {
    "digits": "6",
    "period": "30",
    "algorithm": "SHA1",
    "port": "5432",
}


def _fields_for(type_name: str) -> tuple[dict[str, str], dict[str, str]]:
    spec = ENTRY_TYPES[type_name]
    if spec.free_fields:
        return {"region": "eu-west-1"}, {"api_token": "tok-custom-123"}
    plain: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for f in spec.fields:
        if f.secret:
            secrets[f.name] = SEED if type_name == "totp" else f"{type_name}-{f.name}-value"
        else:
            plain[f.name] = PLAIN_VALUES.get(f.name, f"{f.name}-text")
    return plain, secrets


@pytest.mark.parametrize("type_name", sorted(ENTRY_TYPES))
def test_every_entry_type_can_be_added_with_all_its_fields(
    vault: Vault, path: Path, type_name: str
) -> None:
    plain, secrets = _fields_for(type_name)
    vault.add(type_name, f"my-{type_name}", "default", [], None, None, change(plain, secrets))

    entry = reopen(path).resolve(f"my-{type_name}")
    assert entry.type == type_name
    assert {k for k, f in entry.fields.items() if f.secret} == set(secrets)
    assert {k: f.value for k, f in entry.fields.items() if not f.secret} == plain
    reopened = reopen(path)
    for name, value in secrets.items():
        assert reopened.reveal(entry, name) == (name, value)
    primary = ENTRY_TYPES[type_name].primary or next(iter(secrets))
    assert reopened.reveal(entry, None) == (primary, secrets[primary])


# ---------------------------------------------------------------------- rollback


def _edit_rename(v: Vault) -> object:
    return v.edit(
        v.resolve("github"),
        new_name="renamed",
        move_to="work",
        add_tags=["x"],
        remove_tags=[],
        url="https://x",
        notes="n",
        change=change(secrets={"password": "rotated"}),
    )


MUTATIONS: dict[str, Callable[[Vault], object]] = {
    "add": lambda v: login(v, "new-entry"),
    "edit": _edit_rename,
    "remove": lambda v: v.remove(v.resolve("github")),
    "space-add": lambda v: v.space_add("other"),
    "space-rename": lambda v: v.space_rename("work", "job"),
    "space-remove": lambda v: v.space_remove("work", force=True),
}


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_a_mutation_whose_save_fails_leaves_memory_exactly_as_before(
    vault: Vault, path: Path, monkeypatch: pytest.MonkeyPatch, mutate: Callable[[Vault], object]
) -> None:
    vault.space_add("work")
    github = login(vault, "github", password="original")
    login(vault, "db", space="work")
    before = state(vault)
    disk_before = on_disk(path)

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    if vault._db is not None:
        monkeypatch.setattr(vault._db, "_conn", FailingCommit(vault._db._conn))
    assert code_of(lambda: mutate(vault)) == "STORAGE_ERROR"
    monkeypatch.undo()

    assert state(vault) == before
    assert on_disk(path) == disk_before
    assert vault.resolve("github") == github
    assert vault.resolve("db", "work").space == "work"
    assert vault.reveal(vault.resolve("github"), None)[1] == "original"
    assert code_of(lambda: vault.resolve("new-entry")) == "ENTRY_NOT_FOUND"
    mutate(vault)  # succeeds once the disk is back: no half-applied state blocks it
