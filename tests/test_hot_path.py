"""The pieces the relay's hot path is made of, each against the slower thing it replaces:

- `eager.start` runs a coroutine inline and behaves like a task once it suspends;
- the audit record is serialized once (`_seal`), byte-identical to the canonical form the
  verifier recomputes;
- `Outcome.json_body` is the CallToolResult the SDK would have written;
- the transport's edge-triggered receive loses no message when replies are sent later, from
  outside a receive batch, and from many peers at once;
- the MCP host hands messages to a connection's SDK server in order through a bounded backlog.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.audit import _canonical, _mac, _seal
from broker.server import eager, mcp_host, mcp_tools
from broker.server.mcp_host import MODERN_EXTRA, Connection, McpHost
from broker.server.peer import Peer
from broker.server.transport import Transport
from broker.wire.errors import EntryNotFound, VaultLocked

from .threaded_transport import dealer, threaded_transport

KEY = bytes(range(32))


# ------------------------------------------------------------------ eager.start


def test_a_coroutine_that_never_suspends_finishes_inline_without_a_task() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def quick() -> None:
            seen.append("ran")

        assert eager.start(quick()) is None
        assert seen == ["ran"]  # before the caller's next statement, not a loop turn later

    asyncio.run(main())


def test_a_coroutine_that_suspends_is_finished_by_a_task_with_each_awaited_result() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        seen: list[Any] = []

        async def slow() -> None:
            seen.append(await first)
            await asyncio.sleep(0)  # a bare yield
            try:
                await second
            except ValueError as exc:
                seen.append(f"caught {exc}")
            seen.append(await asyncio.sleep(0.001, result="slept"))

        task = eager.start(slow())
        assert task is not None and seen == []
        first.set_result("one")
        await asyncio.sleep(0.01)
        assert seen == ["one"]
        second.set_exception(ValueError("two"))
        await asyncio.wait_for(task, 5)
        assert seen == ["one", "caught two", "slept"]

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def waits() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled inside")
                raise

        task = eager.start(waits())
        assert task is not None
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled inside"]

    asyncio.run(main())


def test_an_exception_before_the_first_suspension_reaches_the_caller() -> None:
    async def main() -> None:
        async def fails() -> None:
            raise KeyError("early")

        with pytest.raises(KeyError):
            eager.start(fails())

    asyncio.run(main())


# ------------------------------------------------------------------ audit serialization

_keys = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12
).filter(lambda k: k != "mac")
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=8), st.booleans())
def test_a_sealed_record_is_byte_identical_to_the_canonical_form_the_verifier_checks(
    doc: dict[str, Any], signed: bool
) -> None:
    key = KEY if signed else None
    mac, line = _seal(key, doc)
    assert line == _canonical({**doc, "mac": mac})
    if signed:
        assert mac == _mac(KEY, json.loads(line))
    else:
        assert mac is None


# ------------------------------------------------------------------ Outcome.json_body


def _sdk_form(outcome: mcp_tools.Outcome) -> dict[str, Any]:
    """What the SDK server writes for this result (`McpHost._run`'s pump: exclude_unset)."""
    doc: dict[str, Any] = json.loads(
        outcome.to_mcp().model_dump_json(by_alias=True, exclude_unset=True)
    )
    return doc


@pytest.mark.parametrize(
    "outcome",
    [
        mcp_tools.Outcome(
            {"entry": {"id": "e1", "name": "naïve ☃", "tags": ["a", 'q"uote']}},
            json.dumps(
                {"entry": {"id": "e1", "name": "naïve ☃", "tags": ["a", 'q"uote']}},
                ensure_ascii=False,
                separators=(",", ":"),
            ),
            is_error=False,
            structured_json=json.dumps(
                {"entry": {"id": "e1", "name": "naïve ☃", "tags": ["a", 'q"uote']}},
                ensure_ascii=False,
                separators=(",", ":"),
            ),
        ),
        mcp_tools.error_outcome(EntryNotFound("no entry named 'x\\y'")),
        mcp_tools.error_outcome(VaultLocked()),
        mcp_tools.Outcome({"ready": True, "message": "ok"}, "ok", is_error=False),
    ],
    ids=["success", "not-found", "locked", "status"],
)
def test_the_fast_json_body_is_the_result_the_sdk_would_write(
    outcome: mcp_tools.Outcome,
) -> None:
    assert json.loads(outcome.json_body()) == _sdk_form(outcome)
    modern = json.loads(outcome.json_body(MODERN_EXTRA))
    assert modern.pop("resultType") == "complete"
    meta = modern.pop("_meta")
    assert meta.pop(mcp_host.SERVER_INFO_META)["name"] == "apm"
    if meta:  # an error's {code, message, hint} shares `_meta` with the server info
        modern["_meta"] = meta
    assert modern == _sdk_form(outcome)


def test_a_lone_surrogate_in_stored_text_still_gives_valid_utf8_json() -> None:
    structured = {"entry": {"name": "bad \ud800 name"}}
    text = json.dumps(structured, ensure_ascii=False, separators=(",", ":"))
    outcome = mcp_tools.Outcome(structured, text, is_error=False, structured_json=text)
    raw = outcome.json_body(MODERN_EXTRA)
    raw.decode("utf-8")  # strict: no surrogate bytes on the wire
    doc = json.loads(raw)
    assert doc["structuredContent"] == structured and doc["resultType"] == "complete"


# ------------------------------------------------------------------ transport


def test_a_message_arriving_while_a_later_reply_is_sent_is_still_received(
    tmp_path: Path,
) -> None:
    """libzmq's descriptor is edge-triggered: a send processes the socket's pending commands,
    including the one announcing a message that has just arrived, and the descriptor does not
    fire for it again. The message must not be stranded until some other peer writes."""

    def receiver_for(transport: Transport) -> Any:
        pending: set[asyncio.Task[None]] = set()

        async def later(identity: bytes, body: bytes) -> None:
            time.sleep(0.05)  # busy: the next request arrives meanwhile, unread
            transport.send_frames(identity, body)

        def receiver(identity: bytes, frames: list[bytes], peer: Peer | None) -> None:
            if frames[0].startswith(b"slow"):
                task = asyncio.create_task(later(identity, frames[0]))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                transport.send_frames(identity, frames[0])

        return receiver

    with threaded_transport(tmp_path, receiver_for) as transport:
        addr = transport.addr
        ctx, sock = dealer(addr)
        try:
            for i in range(3):
                sock.send(b"slow-%d" % i)
                time.sleep(0.015)
                sock.send(b"quick-%d" % i)
                answers: set[bytes] = set()
                for _ in range(2):
                    assert sock.poll(3000), f"round {i}: answered only {answers}"
                    answers.add(sock.recv())
                assert answers == {b"slow-%d" % i, b"quick-%d" % i}
        finally:
            sock.close(linger=0)
            ctx.term()


def test_many_peers_with_replies_inline_and_from_tasks_all_get_every_answer(
    tmp_path: Path,
) -> None:
    peers, per_peer = 8, 300
    got: dict[str, int] = {}

    def receiver_for(transport: Transport) -> Any:
        pending: set[asyncio.Task[None]] = set()

        async def later(identity: bytes, body: bytes) -> None:
            await asyncio.sleep(0)
            transport.send_frames(identity, body)

        def receiver(identity: bytes, frames: list[bytes], peer: Peer | None) -> None:
            assert peer is not None and peer.uid == os.getuid()
            if int(frames[0]) % 3 == 0:  # inline, inside the batch
                transport.send_frames(identity, frames[0])
            else:  # from a task, after the batch
                task = asyncio.create_task(later(identity, frames[0]))
                pending.add(task)
                task.add_done_callback(pending.discard)

        return receiver

    def client(addr: str, name: str) -> None:
        ctx, sock = dealer(addr)
        answered = 0
        try:
            for i in range(per_peer):  # 4 in flight at a time
                sock.send(str(i).encode())
                if i % 4 == 3:
                    for _ in range(4):
                        if not sock.poll(5000):
                            return
                        sock.recv()
                        answered += 1
        finally:
            got[name] = answered
            sock.close(linger=0)
            ctx.term()

    with threaded_transport(tmp_path, receiver_for) as transport:
        addr = transport.addr
        clients = [threading.Thread(target=client, args=(addr, f"c{j}")) for j in range(peers)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
    assert got == {f"c{j}": per_peer for j in range(peers)}


# ------------------------------------------------------------------ the SDK path's backlog


class Frames:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, ...]] = []

    def send_frames(self, identity: bytes, *frames: bytes) -> None:
        self.sent.append((identity, *frames))


def test_messages_wait_in_order_for_a_busy_sdk_server_and_a_flood_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mcp_host, "MAX_BACKLOG", 3)

    async def main() -> None:
        frames = Frames()
        host = McpHost(state=None, transport=frames)  # type: ignore[arg-type]
        send, recv = anyio.create_memory_object_stream[Any](1)
        conn = Connection(
            conn="c1", identity=b"id", accessor="acc", peer=Peer(os.getuid(), os.getgid(), None)
        )
        conn.inbound = send
        host.conns["c1"] = conn
        for i in range(6):  # 1 fits the stream, 3 wait, 2 are refused
            payload = json.dumps({"jsonrpc": "2.0", "id": i, "method": "ping"}).encode()
            host.on_frame(b"id", b"c1", payload, conn.peer)
        refused = [json.loads(f[3]) for f in frames.sent]
        assert [r["id"] for r in refused] == [4, 5]
        assert all(r["error"]["code"] == -32000 for r in refused)
        delivered = []
        async with recv:
            for _ in range(4):
                msg = await recv.receive()
                delivered.append(msg.message.id)
        assert delivered == [0, 1, 2, 3]
        await asyncio.sleep(0)
        assert conn.backlog is None  # drained: the next message goes straight to the stream
        await send.aclose()

    asyncio.run(main())


# ------------------------------------------------------------------ the audit checkpoint hook


def test_the_checkpoint_hook_wakes_the_loop_when_a_record_is_written_from_another_thread() -> None:
    """Records may be written from the broker's I/O threads; the deferred checkpoint must then
    run on the loop's thread and not wait for the loop's next unrelated wake-up."""
    from broker.server.daemon import _on_loop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        defer = _on_loop(loop)
        ran = asyncio.Event()
        threads: list[int] = []

        def checkpoint() -> None:
            threads.append(threading.get_ident())
            ran.set()

        worker = threading.Thread(target=defer, args=(checkpoint,))
        worker.start()
        await asyncio.wait_for(ran.wait(), timeout=5)  # nothing else wakes this loop
        worker.join()
        assert threads == [threading.get_ident()]
        defer(checkpoint)  # from the loop's own thread: the next turn
        ran.clear()
        await asyncio.wait_for(ran.wait(), timeout=5)

    asyncio.run(main())


def test_a_checkpoint_deferred_inside_a_receive_batch_runs_when_the_batch_ends(
    tmp_path: Path,
) -> None:
    """The broker's checkpoint hook: a record written while a batch of messages is being
    received has its checkpoint written when that batch ends (after the replies went out),
    not by an event-loop turn of its own; outside a batch, the caller schedules it."""
    from broker.server.daemon import _on_loop

    events: list[str] = []
    handles: list[object] = []

    def receiver_for(transport: Transport) -> Any:
        defer = _on_loop(asyncio.get_running_loop(), transport)

        def receiver(identity: bytes, frames: list[bytes], peer: Peer | None) -> None:
            body = frames[0]
            events.append(f"recv {body.decode()}")
            handles.append(defer(lambda: events.append(f"checkpoint after {body.decode()}")))
            transport.send_frames(identity, body)

        return receiver

    with threaded_transport(tmp_path, receiver_for) as transport:
        addr = transport.addr
        ctx, sock = dealer(addr)
        try:
            for i in range(3):
                sock.send(b"m%d" % i)
                assert sock.poll(3000)
                assert sock.recv() == b"m%d" % i
        finally:
            sock.close(linger=0)
            ctx.term()
    # every checkpoint ran, after its record, and none needed a call_soon (a Handle)
    assert sorted(events) == sorted(
        item for i in range(3) for item in (f"recv m{i}", f"checkpoint after m{i}")
    ), events
    for i in range(3):
        assert events.index(f"recv m{i}") < events.index(f"checkpoint after m{i}")
    assert handles == [None, None, None]
    transport_free = Transport("ipc:///nonexistent/x.sock", tmp_path / "x.lock")
    assert transport_free.after_batch(lambda: None) is False  # no batch: the caller schedules
    transport_free.close()


def test_an_entrys_metadata_built_without_model_construct_is_the_same_model() -> None:
    """`StoredEntry.meta` skips pydantic's model_construct loop; the model it builds must be
    the one model_construct (and validation) would give: equal, same fields set, same JSON."""
    from datetime import UTC, datetime

    from broker.core.vault import HistoryItem, StoredEntry, StoredField
    from broker.wire.entries import EntryMeta, FieldMeta

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    old = HistoryItem(sealed="y", replaced_at=now)
    entry = StoredEntry(
        id="e_1",
        name="github",
        type="login",
        space="default",
        tags=["work"],
        url="https://github.com",
        notes=None,
        fields={
            "username": StoredField(secret=False, value="me"),
            "password": StoredField(secret=True, sealed="x", history=[old]),
        },
        created_at=now,
        updated_at=now,
    )
    fast = entry.meta()
    slow = EntryMeta.model_construct(
        id="e_1",
        name="github",
        type="login",
        space="default",
        tags=["work"],
        url="https://github.com",
        notes=None,
        fields={
            "username": FieldMeta.model_construct(secret=False, value="me", history=0),
            "password": FieldMeta.model_construct(secret=True, value=None, history=1),
        },
        created_at=now,
        updated_at=now,
    )
    assert fast == slow
    assert fast.model_fields_set == set(EntryMeta.model_fields)
    assert fast.fields["password"].model_fields_set == set(FieldMeta.model_fields)
    assert fast.model_dump_json() == slow.model_dump_json()
    assert EntryMeta.model_validate(fast.model_dump()) == fast
    assert fast.model_copy(update={"name": "other"}).name == "other" and fast.name == "github"


def test_an_error_body_has_no_structured_content_and_its_code_in_meta_in_both_eras() -> None:
    outcome = mcp_tools.error_outcome(EntryNotFound("no entry named 'x\ud800'"))
    for extra in ("", MODERN_EXTRA):
        doc = json.loads(outcome.json_body(extra).decode("utf-8"))
        assert "structuredContent" not in doc and doc["isError"] is True
        assert doc["_meta"][mcp_tools.ERROR_META]["code"] == "ENTRY_NOT_FOUND"
        assert doc["content"][0]["text"].startswith("Error ENTRY_NOT_FOUND:")


def test_a_record_holding_the_mac_placeholder_is_still_sealed_canonically() -> None:
    """`_seal` serializes once with a placeholder `mac`; a field that holds the same member
    (never in practice: the placeholder is random per process) makes it serialize apart."""
    from broker.core import audit

    for doc in (
        {"a": {"mac": audit._MAC_MARK}, "z": 1},
        {"z": {"mac": audit._MAC_MARK}},
        {"a": audit._MAC_SLOT},
        {},
    ):
        for key in (KEY, None):
            mac, line = _seal(key, doc)
            assert line == _canonical({**doc, "mac": mac})
            if key is not None:
                assert mac == _mac(KEY, json.loads(line))


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    ),
    st.booleans(),
    st.booleans(),
)
def test_the_prebuilt_encoder_writes_what_json_writes(
    doc: Any, sort_keys: bool, ensure_ascii: bool
) -> None:
    """broker.wire.fastjson reuses one C encoder; the text must be JSONEncoder's, NaN and
    non-ASCII included."""
    from broker.wire import fastjson

    fast = fastjson.encoder(sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=str)
    slow = json.JSONEncoder(
        sort_keys=sort_keys, ensure_ascii=ensure_ascii, separators=(",", ":"), default=str
    )
    assert fast(doc) == slow.encode(doc)


def test_a_records_timestamp_from_the_default_clock_is_datetimes_isoformat(
    tmp_path: Path,
) -> None:
    """The default clock's records take their `ts` from one time_ns read, the date and time
    formatted once per second; it must be the text datetime.now(UTC).isoformat gives."""
    from datetime import UTC, datetime

    from broker.core.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()
    try:
        for _ in range(3):
            before = datetime.now(UTC)
            doc = log.append("probe")
            after = datetime.now(UTC)
            ts = doc["ts"]
            assert ts == datetime.fromisoformat(ts).isoformat(timespec="microseconds")
            assert before <= datetime.fromisoformat(ts) <= after
    finally:
        log.close()


@pytest.mark.parametrize("key", ["password", "token", "value", "secret", "seq", "mac", "ts"])
def test_an_audit_record_refuses_a_secret_or_chain_field_name(tmp_path: Path, key: str) -> None:
    from broker.core.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()
    try:
        with pytest.raises(ValueError, match=key):
            log.append("probe", ok="fine", **{key: "x"})
        assert log.seq == 0  # nothing was written
    finally:
        log.close()


def test_get_entry_shaped_without_models_is_the_output_models_json_and_never_stale(
    tmp_path: Path,
) -> None:
    """get_entry's answer is built without GetEntryOut and its metadata JSON is remembered per
    stored entry: it must be exactly what the model gives, with and without a secret, and an
    entry replaced in the vault (an edit, even one keeping `updated_at`) is never answered
    from what was remembered for the old object."""
    from broker.core.vault import Change
    from broker.server.context import Context

    from .twin import twin_of

    def slow(meta: Any, secret: Any = None) -> str:  # the model round trip it replaces
        out = mcp_tools.GetEntryOut(entry=meta, secret=secret)
        return mcp_tools._COMPACT(out.model_dump(mode="json"))

    async def main() -> None:
        with twin_of(tmp_path, "correct horse battery staple") as twin:
            vault = twin.vault
            change = Change(
                fields={"username": "ümlaut \u2028"}, secrets={"password": "pw"}, remove_fields=[]
            )
            entry = vault.add("login", "gh ☃", "default", ["t"], "https://e.example", None, change)
            _, rec = twin.session(scope="secrets")
            ctx = Context(state=twin.state, peer=twin.peer, auth=None, request_id="", session=rec)
            for _ in range(2):  # the second answer comes from what the first remembered
                got = await mcp_tools.run(ctx, "get_entry", {"entry": "gh ☃"})
                assert not got.is_error and got.text == got.structured_json
                assert got.text == slow(vault.entries[entry.id].meta())
                assert got.structured == json.loads(got.text)
            with_secret = await mcp_tools.run(
                ctx, "get_entry", {"entry": entry.id, "include_secret": True}
            )
            secret = mcp_tools.SecretField(field="password", value="pw")
            assert with_secret.text == slow(entry.meta(), secret)
            # the vault holds a new object for the entry, with the same updated_at
            vault.entries[entry.id] = entry.model_copy(update={"tags": ["moved"], "url": None})
            again = await mcp_tools.run(ctx, "get_entry", {"entry": entry.id})
            assert json.loads(again.text)["entry"]["tags"] == ["moved"]
            assert again.text == slow(vault.entries[entry.id].meta())
            vault.entries[entry.id] = entry  # as it was, for the vault's own checks at lock

    asyncio.run(main())


_REFS = st.text(max_size=210) | st.sampled_from(["", "a", "x" * 200, "x" * 201, " ", "é" * 200])
_SPACES = st.none() | st.text(max_size=70) | st.sampled_from(["work", "a.b-c_d", "a b", "x" * 65])


@settings(max_examples=400, deadline=None)
@given(_REFS, _SPACES)
def test_get_entrys_arguments_accept_exactly_what_the_entry_ref_it_builds_unvalidated_accepts(
    ref: str, space: str | None
) -> None:
    """get_entry builds its EntryRef without validating again (`construct`): that is sound only
    while the tool's argument schema accepts exactly the refs and spaces EntryRef accepts.
    A limit changed on one side only (a longer name, another space pattern) fails here."""
    from pydantic import ValidationError

    from broker.core.vault import construct
    from broker.wire.protocol import EntryRef

    def accepted(build: Any) -> Any:
        try:
            return build()
        except ValidationError:
            return None

    args = accepted(lambda: mcp_tools.GetEntryArgs.model_validate({"entry": ref, "space": space}))
    wire = accepted(lambda: EntryRef.model_validate({"ref": ref, "space": space}))
    assert (args is None) == (wire is None), (ref, space)
    if args is not None:
        built = construct(EntryRef, {"ref": args.entry, "space": args.space})
        assert built == wire and built.model_dump_json() == wire.model_dump_json()


def test_entry_show_answers_each_stored_entry_objects_metadata_and_never_a_stale_one(
    tmp_path: Path,
) -> None:
    """entry.show builds an entry's metadata once per stored entry object (`shown_meta`): a
    second show of the same object answers the same metadata; an edit (a new object in the
    vault, even with the same `updated_at`), a removal, or another vault never gets the old."""
    from broker.core.vault import Change
    from broker.server import handlers
    from broker.server.context import Context
    from broker.wire.protocol import EntryRef

    from .twin import twin_of

    async def main() -> None:
        with twin_of(tmp_path, "correct horse battery staple") as twin:
            vault = twin.vault
            change = Change(fields={"username": "me"}, secrets={"password": "pw"}, remove_fields=[])
            entry = vault.add("login", "gh", "default", ["t"], "https://e.example", None, change)
            _, rec = twin.session(scope="read")
            ctx = Context(state=twin.state, peer=twin.peer, auth=None, request_id="", session=rec)
            ref = EntryRef(ref="gh")
            first = (await handlers.process_entry_show(ctx, ref)).entry
            again = (await handlers.process_entry_show(ctx, ref)).entry
            assert again is first and first == entry.meta()
            # its JSON (get_entry's answer) is remembered with it, for that very object only
            shown = handlers.shown_json(vault, first, mcp_tools._COMPACT)
            assert handlers.shown_json(vault, first, mcp_tools._COMPACT) is shown
            assert shown[0] == first.model_dump(mode="json")
            assert json.loads(shown[1]) == shown[0]
            assert handlers.shown_json(vault, first.model_copy(), mcp_tools._COMPACT) is not shown
            vault.entries[entry.id] = entry.model_copy(update={"tags": ["moved"], "url": None})
            moved = (await handlers.process_entry_show(ctx, ref)).entry
            assert (
                moved.tags == ["moved"]
                and moved.url is None
                and moved == vault.entries[entry.id].meta()
            )
            assert first.tags == ["t"]  # what was answered before is not changed either
            moved_doc, moved_text = handlers.shown_json(vault, moved, mcp_tools._COMPACT)
            assert moved_doc["tags"] == ["moved"] and json.loads(moved_text) == moved_doc
            assert handlers.shown_json(vault, first, mcp_tools._COMPACT)[0]["tags"] == ["t"]
            vault.entries[entry.id] = entry  # as it was, for the vault's own checks at lock

    asyncio.run(main())


def test_remembered_tool_arguments_are_what_validation_gives_and_never_cross_types() -> None:
    """get_entry's validated arguments are remembered by their exact items: a hit must equal
    a fresh validation, `True` and `1` (equal, same hash) stay apart, an invalid call is
    refused every time (never remembered), and the model is frozen (a shared instance cannot
    be changed by one call for the next)."""
    from pydantic import ValidationError

    model = mcp_tools.GetEntryArgs
    for args in (
        {"entry": "gh"},
        {"entry": "gh", "include_secret": True},
        {"entry": "gh", "include_secret": 1},
        {"entry": "gh", "space": "work", "field": "password"},
    ):
        first = mcp_tools._args(model, dict(args))
        again = mcp_tools._args(model, dict(args))
        assert again is first
        assert first == model.model_validate(args)
    as_bool = mcp_tools._args(model, {"entry": "gh", "include_secret": True})
    as_int = mcp_tools._args(model, {"entry": "gh", "include_secret": 1})
    assert as_bool is not as_int  # equal values, but not the same key
    for bad in ({"entry": ""}, {"entry": "gh", "include_secret": "maybe"}, {"entry": "x" * 201}):
        for _ in range(2):
            with pytest.raises(ValidationError):
                mcp_tools._args(model, bad)
    nested = {"entry": "gh", "space": ["work"]}  # not a scalar: validated, not remembered
    with pytest.raises(ValidationError):
        mcp_tools._args(model, nested)
    with pytest.raises(ValidationError):
        as_bool.entry = "other"  # type: ignore[misc]
