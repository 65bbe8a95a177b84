"""The one bulk-add path: entry.add_batch when the broker has it, per-entry adds otherwise."""

from __future__ import annotations

import io
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from broker.cli import batch
from broker.wire.entries import EntryMeta
from broker.wire.errors import AlreadyExists, InvalidParameters, PermissionDenied
from broker.wire.protocol import (
    METHODS,
    EntryAddParams,
    EntryListResult,
    EntryResult,
    SecretValue,
    SpaceInfo,
    SpaceListResult,
)


def _meta(name: str, type_: str = "login") -> EntryMeta:
    now = datetime.now(UTC)
    return EntryMeta(
        id=f"id-{name}", name=name, type=type_, space="default", created_at=now, updated_at=now
    )  # type: ignore[arg-type]


class FakeBroker:
    def __init__(self, has_batch: bool, existing: list[str] = ()) -> None:  # type: ignore[assignment]
        self.has_batch = has_batch
        self.names = set(existing)
        self.calls: list[str] = []

    def call_raw(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        self.calls.append(method)
        if method == batch.BATCH_METHOD:
            if not self.has_batch:
                raise InvalidParameters("unknown method", data={"method": method})
            assert params["atomic"] is False
            added, refused = [], []
            for i, e in enumerate(params["entries"]):
                if e["name"] in self.names or e["name"] == "refused":
                    refused.append({"index": i, "code": "ALREADY_EXISTS", "message": "exists"})
                else:
                    self.names.add(e["name"])
                    added.append("id-" + e["name"])
            return {"added": added, "refused": refused}
        raise AssertionError(method)

    def call(self, method: str, params: BaseModel | None = None, **kw: Any) -> Any:
        self.calls.append(method)
        if method == "space.list":
            return SpaceListResult(spaces=[SpaceInfo(name="default", entries=len(self.names))])
        if method == "entry.list":
            metas = [_meta(n) for n in sorted(self.names)]
            return EntryListResult(entries=metas, total=len(metas))
        if method == "entry.add":
            assert isinstance(params, EntryAddParams)
            if params.name in self.names or params.name == "refused":
                raise AlreadyExists()
            self.names.add(params.name)
            return EntryResult(entry=_meta(params.name))
        if method == "entry.edit":
            return EntryResult(entry=_meta("x"))
        assert method in METHODS
        raise AssertionError(method)


def _items(*names: str) -> list[EntryAddParams]:
    return [
        EntryAddParams(
            type="login", name=n, secrets={"password": SecretValue(value=SecretStr("pw-" + n))}
        )
        for n in names
    ]


def test_a_broker_with_the_batch_method_gets_one_call_per_chunk() -> None:
    fake = FakeBroker(has_batch=True)
    s = batch.commit_entries(fake, {}, _items("a", "b", "c"))  # type: ignore[arg-type]
    assert s.used_batch and s.added == ["a", "b", "c"]
    assert fake.calls.count(batch.BATCH_METHOD) == 1 and "entry.add" not in fake.calls


def test_a_broker_without_it_gets_one_add_per_entry() -> None:
    fake = FakeBroker(has_batch=False)
    s = batch.commit_entries(fake, {}, _items("a", "b", "c"))  # type: ignore[arg-type]
    assert not s.used_batch and s.added == ["a", "b", "c"]
    assert fake.calls.count(batch.BATCH_METHOD) == 1  # asked once, then never again
    assert fake.calls.count("entry.add") == 3


@pytest.mark.parametrize("has_batch", [True, False])
def test_a_refused_entry_fails_alone_and_the_rest_still_go_in(has_batch: bool) -> None:
    fake = FakeBroker(has_batch=has_batch)  # the vault refuses "refused" (a bad TOTP seed, say)
    items = _items("a", "refused", "b")
    s = batch.commit_entries(fake, {}, items)  # type: ignore[arg-type]
    assert s.added == ["a", "b"]
    assert s.failed == [("refused", "ALREADY_EXISTS")]
    assert s.used_batch is has_batch


def test_duplicates_skip_rename_and_overwrite() -> None:
    for mode, check in (
        ("skip", lambda s: s.skipped == [("a", "an entry with this name exists")]),
        ("rename", lambda s: s.renamed == [("a", "a (2)")]),
        ("overwrite", lambda s: s.overwritten == ["a"]),
    ):
        fake = FakeBroker(has_batch=False, existing=["a"])
        s = batch.commit_entries(fake, {}, _items("a", "b"), mode)  # type: ignore[arg-type]
        assert check(s), mode
        assert "b" in s.added


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_shows_only_on_a_terminal_and_only_for_big_imports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    p = batch.Progress(100)
    for _ in range(100):
        p.advance()
    p.close()
    assert "\rimporting [" in tty.getvalue() and "100/100" in tty.getvalue()
    tty2 = _Tty()
    monkeypatch.setattr(sys, "stderr", tty2)
    batch.Progress(3).advance()
    assert tty2.getvalue() == ""
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    batch.Progress(1000).advance()
    assert pipe.getvalue() == ""


def test_a_session_without_write_stops_at_the_first_refusal() -> None:
    class ReadOnly(FakeBroker):
        def call(self, method: str, params: BaseModel | None = None, **kw: Any) -> Any:
            if method == "entry.add":
                self.calls.append(method)
                raise PermissionDenied()
            return super().call(method, params, **kw)

    fake = ReadOnly(has_batch=False)
    with pytest.raises(PermissionDenied):
        batch.commit_entries(fake, {}, _items("a", "b", "c"))  # type: ignore[arg-type]
    assert fake.calls.count("entry.add") == 1
