"""Just-in-time access in-process: the request store, grants under an injected clock, the tool
layer and the dispatcher twin, notifications (a local HTTP server) and `apm run`'s masking.

Nothing here sleeps to let time pass: grants expire by advancing a fake clock; webhook
deliveries are awaited with `Notifier.drain` and short, injected retry delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from mcp import types as mt

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.cli.masking import MARK, Masker, forms
from broker.core.bindings import AncestryCache, Proc
from broker.core.requests import PENDING_TTL, RequestStore
from broker.core.sessions import SessionRecord
from broker.core.vault import Change
from broker.server.notify import Notifier
from broker.server.peer import Peer
from broker.server.state import State, Throttle
from broker.wire.errors import ApmError
from broker.wire.protocol import Response

from .conftest import register_secret
from .hook_server import Hook
from .mcp_client import error_body
from .twin import Clock, SyncTwin, broker_state

PASSWORD = "correct horse battery staple"
STRIPE = "sk_live_Stripe-4471-unique"
OTHER = "other-Secret-9182-unique"
WHY = "run the billing migration script"
for _s in (STRIPE, OTHER):
    register_secret(_s)


# ---------------------------------------------------------------------- fakes and the twin


def _walk(pid: int) -> tuple[Proc, ...]:
    return (
        Proc(pid=pid, create_time=float(pid), name="python3", exe="/usr/bin/python3"),
        Proc(pid=1, create_time=1.0, name="init", exe="/sbin/init"),
    )


class FakeNotifier:
    """Records what the handlers would send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, title: str, body: str, payload: dict[str, Any]) -> None:
        self.sent.append((title, body, payload))


@dataclass
class Twin(SyncTwin):
    """The broker's dispatcher in-process: real handlers and tools, a real vault, a fake clock."""

    notifier: FakeNotifier = field(default_factory=FakeNotifier)

    @property
    def default_pid(self) -> int | None:
        return 4242

    @property
    def peer(self) -> Peer:
        return self.peer_for(4242)

    def delegate(self, scope: str = "read", label: str = "agent-x") -> tuple[str, SessionRecord]:
        res = self.owner(
            "session.create",
            {"scope": scope, "ttl_seconds": 24 * 3600, "label": label, "bind_host": False},
        )
        register_secret(res["token"])
        return res["token"], self.state.sessions().lookup(res["token"])

    def add(self, name: str, secrets: dict[str, str], kind: str = "api_key") -> str:
        change = Change(fields={}, secrets=secrets, remove_fields=[])
        return self.state.cache.get().add(kind, name, "default", [], None, None, change).id

    def ask(
        self,
        rec: SessionRecord,
        entry: str = "stripe",
        minutes: int = 5,
        access: str = "reveal",  # these tests read values; test_grant_kinds.py covers `use`
        **kw: Any,
    ) -> str:
        args = {"entry": entry, "duration_minutes": minutes, "justification": WHY, **kw}
        body = ok_of(
            self.tool(
                rec,
                "request_access",
                {**args, "access": access},
            )
        )
        assert body["state"] == "pending"
        return str(body["request_id"])


def code_of(resp: Response) -> str:
    assert not resp.ok and resp.error is not None, resp
    return resp.error.code


def ok_of(result: mt.CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.structured_content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def tool_code(result: mt.CallToolResult) -> str:
    return str(error_body(result)["code"])


def twin_state(path: Path, clock: Clock) -> contextlib.AbstractContextManager[State]:
    """The in-process broker state the twin drives: its clock is `clock`, its process tree
    `_walk`'s."""
    return broker_state(
        path,
        PASSWORD,
        sign_audit=False,
        clock=clock,
        ancestry=AncestryCache(walk=_walk, create_time_of=lambda pid: float(pid)),
        host="host-a",
        throttle=Throttle(),
    )


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    clock = Clock()
    notifier = FakeNotifier()
    with twin_state(tmp_path, clock) as state:
        state.notifier = notifier  # type: ignore[assignment]
        loop = asyncio.new_event_loop()
        t = Twin(state, loop, clock, PASSWORD, notifier)
        t.add("stripe", {"key": STRIPE})
        t.add("other", {"key": OTHER})
        yield t
        loop.close()


# ---------------------------------------------------------------------- the request store


def new_store(clock: Clock) -> RequestStore:
    return RequestStore([], clock)


def make(store: RequestStore, accessor: str = "ses_a", field: str | None = None) -> str:
    return store.create(
        accessor=accessor,
        entry_id="e1",
        entry_name="stripe",
        space="default",
        field=field,
        main_field="key",
        minutes=10,
        justification=WHY,
    ).id


def test_an_approved_request_grants_its_session_that_entry_until_the_duration_ends() -> None:
    clock = Clock()
    s = new_store(clock)
    rid = make(s)
    assert s.grant("ses_a", "e1", "key") is None  # pending grants nothing
    req = s.decide(rid, True, None, None, 60)
    assert req.status(clock()) == "approved"
    assert req.expires_at == clock() + timedelta(minutes=10)
    assert s.grant("ses_a", "e1", "key") is req
    assert s.grant("ses_b", "e1", "key") is None
    assert s.grant("ses_a", "e2", "key") is None
    clock.advance(minutes=9, seconds=59)
    assert s.grant("ses_a", "e1", "key") is req
    clock.advance(seconds=1)
    assert s.grant("ses_a", "e1", "key") is None
    assert s.get(rid, "ses_a").status(clock()) == "expired"


def test_a_request_for_one_field_grants_that_field_alone() -> None:
    s = new_store(Clock())
    rid = make(s, field="key")
    s.decide(rid, True, None, None, 60)
    assert s.grant("ses_a", "e1", "key") is not None
    assert s.grant("ses_a", "e1", "password") is None


def test_a_request_is_found_only_by_its_own_session() -> None:
    s = new_store(Clock())
    rid = make(s, "ses_a")
    assert s.get(rid, "ses_a").id == rid
    for who, ref in (("ses_b", rid), ("ses_a", "req_0000000000000000")):
        with pytest.raises(ApmError) as info:
            s.get(ref, who)
        assert info.value.code == "REQUEST_NOT_FOUND"
    assert [r.id for r in s.listing("ses_b")] == []
    assert [r.id for r in s.listing("ses_a")] == [rid]


def test_a_decided_request_cannot_be_decided_again_and_a_revoked_grant_grants_nothing() -> None:
    clock = Clock()
    s = new_store(clock)
    rid = make(s)
    s.decide(rid, True, 3, "ok", 60)
    with pytest.raises(ApmError) as info:
        s.decide(rid, False, None, None, 60)
    assert info.value.code == "REQUEST_CLOSED"
    s.revoke(rid)
    assert s.grant("ses_a", "e1", "key") is None
    with pytest.raises(ApmError) as info:
        s.revoke(rid)
    assert info.value.code == "REQUEST_CLOSED"


def test_approving_for_longer_than_the_maximum_is_invalid_parameters() -> None:
    s = new_store(Clock())
    rid = make(s)
    with pytest.raises(ApmError) as info:
        s.decide(rid, True, 61, None, 60)
    assert info.value.code == "INVALID_PARAMETERS"


def test_an_undecided_request_expires_after_a_day_and_can_no_longer_be_approved() -> None:
    clock = Clock()
    s = new_store(clock)
    rid = make(s)
    clock.advance(seconds=PENDING_TTL.total_seconds())
    assert s.get(rid, None).status(clock()) == "expired"
    assert s.listing(None, pending_only=True) == []
    with pytest.raises(ApmError) as info:
        s.decide(rid, True, None, None, 60)
    assert info.value.code == "REQUEST_CLOSED"


def test_requests_survive_a_reload_of_the_stored_table_and_hold_no_secret() -> None:
    clock = Clock()
    s = new_store(clock)
    rid = make(s)
    s.decide(rid, True, None, "fine", 60)
    again = RequestStore(s.dump(), clock)
    assert again.grant("ses_a", "e1", "key") is not None
    assert again.get(rid, "ses_a").reason == "fine"


# ---------------------------------------------------------------------- the twin: tools + grants


def test_a_grant_opens_the_entry_to_every_path_and_expires_with_the_clock(twin: Twin) -> None:
    token, rec = twin.delegate("read")
    assert tool_code(twin.tool(rec, "decrypt_entry", {"entry": "stripe"})) == "PERMISSION_DENIED"
    assert code_of(twin.call("entry.get", {"ref": "stripe"}, token=token)) == "PERMISSION_DENIED"
    rid = twin.ask(rec, minutes=5)
    ref = "apm://default/stripe/key"
    resolve = {"refs": [ref]}
    assert code_of(twin.call("secret.resolve", resolve, token=token)) == "PERMISSION_DENIED"
    # approving needs the owner: a session token is refused
    assert code_of(twin.call("request.approve", {"request_id": rid}, token=token)) == (
        "PERMISSION_DENIED"
    )
    assert twin.owner("request.approve", {"request_id": rid})["state"] == "approved"

    details = ok_of(twin.tool(rec, "get_access_details", {"request_id": rid}))
    assert details["reference"] == ref
    assert STRIPE not in json.dumps(details)
    assert ok_of(twin.tool(rec, "decrypt_entry", {"entry": "stripe"}))["value"] == STRIPE
    got = twin.ok("entry.get", {"ref": "stripe"}, token=token)
    assert got["value"] == STRIPE
    resolved = twin.ok("secret.resolve", resolve, token=token)
    assert [s["value"] for s in resolved["secrets"]] == [STRIPE]
    # not another entry
    assert tool_code(twin.tool(rec, "decrypt_entry", {"entry": "other"})) == "PERMISSION_DENIED"
    other = {"refs": ["apm://default/other/key"]}
    assert code_of(twin.call("secret.resolve", other, token=token)) == "PERMISSION_DENIED"

    twin.clock.advance(minutes=4, seconds=59)
    assert ok_of(twin.tool(rec, "decrypt_entry", {"entry": "stripe"}))["value"] == STRIPE
    twin.clock.advance(seconds=1)
    assert tool_code(twin.tool(rec, "decrypt_entry", {"entry": "stripe"})) == "PERMISSION_DENIED"
    assert code_of(twin.call("entry.get", {"ref": "stripe"}, token=token)) == "PERMISSION_DENIED"
    assert code_of(twin.call("secret.resolve", resolve, token=token)) == "PERMISSION_DENIED"
    assert ok_of(twin.tool(rec, "get_request_status", {"request_id": rid}))["state"] == "expired"
    closed = twin.tool(rec, "get_access_details", {"request_id": rid})
    assert tool_code(closed) == "REQUEST_CLOSED"


def test_an_approved_shorter_duration_is_the_one_that_counts(twin: Twin) -> None:
    token, rec = twin.delegate("read")
    rid = twin.ask(rec, minutes=30)
    res = twin.owner("request.approve", {"request_id": rid, "minutes": 2, "reason": "short"})
    assert res["minutes"] == 2
    twin.clock.advance(minutes=2)
    assert code_of(twin.call("entry.get", {"ref": "stripe"}, token=token)) == "PERMISSION_DENIED"


def test_revocation_takes_effect_at_the_next_call(twin: Twin) -> None:
    token, rec = twin.delegate("read")
    rid = twin.ask(rec)
    twin.owner("request.approve", {"request_id": rid})
    assert twin.ok("entry.get", {"ref": "stripe"}, token=token)["value"] == STRIPE
    assert twin.ok("request.revoke", {"request_id": rid})["state"] == "revoked"
    assert code_of(twin.call("entry.get", {"ref": "stripe"}, token=token)) == "PERMISSION_DENIED"
    assert tool_code(twin.tool(rec, "decrypt_entry", {"entry": "stripe"})) == "PERMISSION_DENIED"
    assert ok_of(twin.tool(rec, "get_request_status", {"request_id": rid}))["state"] == "revoked"


def test_a_denied_request_reports_the_reason_and_grants_nothing(twin: Twin) -> None:
    token, rec = twin.delegate("read")
    rid = twin.ask(rec)
    twin.ok("request.deny", {"request_id": rid, "reason": "not today"})
    status = ok_of(twin.tool(rec, "get_request_status", {"request_id": rid}))
    assert (status["state"], status["reason"]) == ("denied", "not today")
    closed = twin.tool(rec, "get_access_details", {"request_id": rid})
    assert tool_code(closed) == "REQUEST_CLOSED"
    assert code_of(twin.call("entry.get", {"ref": "stripe"}, token=token)) == "PERMISSION_DENIED"
    again = twin.call("request.approve", {"request_id": rid}, password=PASSWORD)
    assert code_of(again) == "REQUEST_CLOSED"


def test_another_session_can_neither_see_nor_use_a_request(twin: Twin) -> None:
    _, rec_a = twin.delegate("read", "agent-a")
    token_b, rec_b = twin.delegate("read", "agent-b")
    rid = twin.ask(rec_a)
    twin.owner("request.approve", {"request_id": rid})
    for tool in ("get_request_status", "get_access_details"):
        assert tool_code(twin.tool(rec_b, tool, {"request_id": rid})) == "REQUEST_NOT_FOUND"
    assert ok_of(twin.tool(rec_b, "list_my_requests", {}))["requests"] == []
    mine = ok_of(twin.tool(rec_a, "list_my_requests", {}))["requests"]
    assert [r["request_id"] for r in mine] == [rid]
    assert tool_code(twin.tool(rec_b, "decrypt_entry", {"entry": "stripe"})) == "PERMISSION_DENIED"
    resolve = {"refs": ["apm://default/stripe/key"]}
    assert code_of(twin.call("secret.resolve", resolve, token=token_b)) == "PERMISSION_DENIED"
    # a session cannot list everyone's requests either (needs admin or the owner)
    assert code_of(twin.call("request.list", {}, token=token_b)) == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"duration_minutes": 61, "justification": WHY}, "duration_minutes"),
        ({"duration_minutes": 0, "justification": WHY}, "duration_minutes"),
        ({"duration_minutes": 5}, "justification"),
        ({"duration_minutes": 5, "justification": "need it"}, "justification"),
        ({"duration_minutes": 5, "justification": WHY, "field": "nope"}, "field"),
    ],
)
def test_request_access_refuses_bad_durations_and_missing_or_short_justifications(
    twin: Twin, args: dict[str, Any], field: str
) -> None:
    _, rec = twin.delegate("read")
    result = twin.tool(rec, "request_access", {"entry": "stripe", **args})
    assert tool_code(result) == "INVALID_PARAMETERS", field
    assert ok_of(twin.tool(rec, "list_my_requests", {}))["requests"] == []
    assert twin.notifier.sent == []


def test_the_configured_maximum_duration_bounds_requests(twin: Twin) -> None:
    _, rec = twin.delegate("read")
    twin.state.request_max_minutes = 10
    args = {"entry": "stripe", "duration_minutes": 11, "justification": WHY}
    assert tool_code(twin.tool(rec, "request_access", args)) == "INVALID_PARAMETERS"
    assert ok_of(twin.tool(rec, "request_access", {**args, "duration_minutes": 10}))


def test_a_request_for_an_unknown_entry_is_entry_not_found(twin: Twin) -> None:
    _, rec = twin.delegate("read")
    args = {"entry": "nope", "duration_minutes": 5, "justification": WHY}
    assert tool_code(twin.tool(rec, "request_access", args)) == "ENTRY_NOT_FOUND"


def test_each_request_and_decision_is_notified_without_any_secret(twin: Twin) -> None:
    token, rec = twin.delegate("read", "agent-x")
    rid = twin.ask(rec, minutes=7)
    twin.owner("request.approve", {"request_id": rid})
    assert len(twin.notifier.sent) == 2
    (_, body1, p1), (_, _, p2) = twin.notifier.sent
    assert f"apm request approve {rid}" in body1
    assert p1["event"] == "request" and p2["event"] == "decision"
    assert p1["request_id"] == p2["request_id"] == rid
    assert p1["entry"] == "stripe"
    assert p1["session_label"] == "agent-x"
    assert p1["justification"] == WHY
    assert p1["duration_minutes"] == 7
    assert p1["approve_command"] == f"apm request approve {rid}"
    assert p2["state"] == "approved"
    everything = json.dumps(twin.notifier.sent)
    for secret in (STRIPE, OTHER, token, PASSWORD):
        assert secret not in everything


# ---------------------------------------------------------------------- the webhook notifier


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook([500, 500])
    yield h
    h.close()


def test_a_webhook_answering_500_twice_is_delivered_on_the_third_attempt(hook: Hook) -> None:
    notifier = Notifier(hook.url, desktop=False, retry_delays=(0.01, 0.01))

    async def main() -> int:
        notifier.send("title", "body", {"request_id": "req_1"})
        before = len(hook.bodies)  # send() only schedules: nothing was attempted yet
        await notifier.drain(timeout=10)
        return before

    assert asyncio.run(main()) == 0
    assert len(hook.bodies) == 3
    doc = json.loads(hook.bodies[-1])
    assert doc["text"] == "*title*\nbody"
    assert doc["apm"] == {"request_id": "req_1"}


def test_a_webhook_that_always_fails_gives_up_after_every_retry() -> None:
    h = Hook([500] * 10)
    try:
        notifier = Notifier(h.url, desktop=False, retry_delays=(0.01, 0.01))

        async def main() -> None:
            notifier.send("t", "b", {})
            await notifier.drain(timeout=10)

        asyncio.run(main())
        assert len(h.bodies) == 3
    finally:
        h.close()


def test_an_unreachable_webhook_gives_up_without_raising_or_blocking_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    notifier = Notifier(f"http://127.0.0.1:{port}/hook", desktop=False, retry_delays=(0.01, 0.01))

    async def main() -> tuple[int, int]:
        notifier.send("t", "b", {"request_id": "req_1"})
        pending = len(notifier._tasks)  # the caller returned with the delivery still ahead
        await notifier.drain(timeout=10)
        return pending, len(notifier._tasks)

    with caplog.at_level(logging.WARNING, logger="apm.broker.notify"):
        pending, left = asyncio.run(main())
    assert pending >= 1
    assert left == 0
    attempts = [r for r in caplog.records if "webhook delivery failed" in r.getMessage()]
    assert len(attempts) == 3
    assert any("gave up after 3 attempts" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- masking


def reference_mask(data: bytes, secrets: list[bytes]) -> bytes:
    """The whole-input answer: leftmost occurrence first, the longest at the same position."""
    alts = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not alts:
        return data
    return re.sub(b"|".join(re.escape(s) for s in alts), MARK.replace(b"\\", b"\\\\"), data)


def stream(masker: Masker, chunks: list[bytes]) -> bytes:
    out = b"".join(masker.feed(c) for c in chunks)
    return out + masker.flush()


def chunked(data: bytes, rng: random.Random, most: int = 7) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(0, most)  # empty chunks too
        out.append(data[i : i + n])
        i += n
    return out


def test_a_secret_split_at_every_possible_boundary_is_always_replaced() -> None:
    secret = STRIPE.encode()
    text = b"before " + secret + b" middle " + secret + secret + b" after"
    expected = text.replace(secret, MARK)
    assert stream(Masker([secret]), [bytes([b]) for b in text]) == expected
    for cut in range(len(text) + 1):
        assert stream(Masker([secret]), [text[:cut], text[cut:]]) == expected, cut
    for a in range(1, len(text)):
        for b in range(a, len(text)):
            chunks = [text[:a], text[a:b], text[b:]]
            assert stream(Masker([secret]), chunks) == expected, (a, b)


def test_random_chunkings_give_the_same_output_as_masking_the_whole_input() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        secrets = [
            bytes(rng.choices(b"abc", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))
        ]
        data = bytes(rng.choices(b"abcx\n", k=rng.randint(0, 60)))
        expected = reference_mask(data, secrets)
        assert stream(Masker(secrets), chunked(data, rng)) == expected, (secrets, data)
        assert stream(Masker(secrets), [bytes([c]) for c in data]) == expected


def test_of_overlapping_secrets_the_longest_wins() -> None:
    short, long = b"abc", b"abcdef"
    for chunks in ([b"xxabcdefyy"], [b"xxab", b"cd", b"efyy"], [bytes([c]) for c in b"xxabcdefyy"]):
        assert stream(Masker([short, long]), chunks) == b"xx" + MARK + b"yy"
    assert stream(Masker([long, short]), [b"abcdeX", b"abc"]) == MARK + b"deX" + MARK


def test_output_is_identical_to_the_input_when_no_secret_occurs() -> None:
    rng = random.Random(99)
    secret = b"zq-never-here"
    for _ in range(100):
        data = bytes(rng.choices(b"abcdefghij \n\x00\xff", k=rng.randint(0, 200)))
        assert stream(Masker([secret]), chunked(data, rng, 30)) == data
    assert stream(Masker([]), [b"plain", b" text"]) == b"plain text"


def test_nothing_is_held_back_beyond_a_secrets_longest_form_and_flush_returns_the_tail() -> None:
    secret = b"0123456789"
    m = Masker([secret])
    longest = max(len(f) for f in forms(secret))  # hex: twice the length (#13.11)
    line = b"hello world, a long line, longer than any form of the secret\n"
    out = m.feed(line)
    assert out == line[: len(out)]
    assert len(out) >= len(line) - (longest - 1)
    assert m.feed(b"") + m.flush() == line[len(out) :]
    m = Masker([secret])
    out = m.feed(b"hello world, a long line\n")
    assert out + m.flush() == b"hello world, a long line\n"
    m = Masker([secret])
    assert m.feed(b"01234") == b""  # could still become the secret
    assert m.flush() == b"01234"
    assert m.flush() == b""


def test_an_approval_refused_for_its_duration_leaves_the_request_untouched() -> None:

    from broker.core.requests import RequestStore
    from broker.wire.errors import InvalidParameters

    store = RequestStore([], lambda: datetime(2026, 1, 1, tzinfo=UTC))
    req = store.create(
        accessor="ses_a",
        entry_id="e1",
        entry_name="db",
        space="default",
        minutes=5,
        justification="run the nightly migration",
    )
    with pytest.raises(InvalidParameters):
        store.decide(req.id, True, 999, "too long", 60)
    assert (req.state, req.decided_at, req.reason) == ("pending", None, None)


# ---------------------------------------------------------------------- #13.13 TOTP seeds

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits, base32
LOGIN_SEED = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"


def test_a_grant_on_a_totp_entry_gives_codes_but_never_the_seed(twin: Twin) -> None:
    twin.add("github-2fa", {"secret": SEED}, kind="totp")
    twin.add("gitlab", {"password": "gl-Password-77", "totp": LOGIN_SEED}, kind="custom")
    token, rec = twin.delegate("read")
    for entry in ("github-2fa", "gitlab"):
        rid = twin.ask(rec, entry=entry)
        assert (
            ok_of(twin.tool(rec, "get_request_status", {"request_id": rid}))["state"] == "pending"
        )
        info = twin.owner("request.list")["requests"]
        assert [r["totp_seed"] for r in info if r["id"] == rid] == [False]
        twin.owner("request.approve", {"request_id": rid})
        # codes: yes
        code = ok_of(twin.tool(rec, "get_totp", {"entry": entry}))["code"]
        assert code.isdigit()
    # the attack: read the seed through every path that opens a field
    for entry, name in (("github-2fa", None), ("github-2fa", "secret"), ("gitlab", "totp")):
        args = {"entry": entry, **({"field": name} if name else {})}
        assert tool_code(twin.tool(rec, "decrypt_entry", args)) == "PERMISSION_DENIED"
        got = twin.tool(rec, "get_entry", {**args, "include_secret": True})
        assert tool_code(got) == "PERMISSION_DENIED"
        ref = {"ref": entry, **({"field": name} if name else {})}
        assert code_of(twin.call("entry.get", ref, token=token)) == "PERMISSION_DENIED"
        space_ref = f"apm://default/{entry}/{name or 'secret'}"
        resolved = twin.call("secret.resolve", {"refs": [space_ref]}, token=token)
        assert code_of(resolved) == "PERMISSION_DENIED"
    # the login's own password is still covered by the whole-entry grant
    assert ok_of(twin.tool(rec, "decrypt_entry", {"entry": "gitlab"}))["value"] == "gl-Password-77"


def test_the_seed_is_given_only_when_the_request_named_it_and_the_approver_saw_that(
    twin: Twin,
) -> None:
    twin.add("github-2fa", {"secret": SEED}, kind="totp")
    register_secret(SEED)
    _, rec = twin.delegate("read")
    rid = twin.ask(rec, entry="github-2fa", field="secret")
    shown = [r for r in twin.owner("request.list")["requests"] if r["id"] == rid]
    assert shown[0]["totp_seed"] is True and shown[0]["field"] == "secret"
    assert "TOTP SEED" in twin.notifier.sent[-1][0]
    twin.owner("request.approve", {"request_id": rid})
    assert ok_of(twin.tool(rec, "decrypt_entry", {"entry": "github-2fa"}))["value"] == SEED
