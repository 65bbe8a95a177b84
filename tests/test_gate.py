"""One operation, one gate: the approval matrix in-process (real handlers, vault file and audit
log; fake clock and a fake MCP client for elicitation).

policy (agent, client, owner) x every mutating operation x path (MCP tool, wire frame): no
change lands without the approval its policy names, and an approved one lands exactly the
previewed arguments. The `apm` command path, and the same attacks over real processes, are in
test_gate_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import broker.server.daemon  # noqa: F401 - declares every operation the real broker serves
from broker.core.sessions import CreateSpec, scope_rank
from broker.core.vault import Change, Vault
from broker.server import dispatch, mcp_tools
from broker.server.context import Context
from broker.server.operations import OPERATIONS, TOOL_OPERATIONS
from broker.wire.errors import ApmError, StorageError

from .twin import Twin, twin_of

PASSWORD = "correct horse battery staple"
NEW = "Gate-New-Secret-5521"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeElicitation:
    """The MCP request context a client with elicitation support gives `client` policy calls."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[str] = []
        self.request_id = 1
        self.session = self

    def check_client_capability(self, _: Any) -> bool:
        return True

    async def elicit_form(self, message: str, schema: Any, rid: Any) -> Any:
        self.asked.append(message)

        @dataclass
        class Answer:
            action: str
            content: dict[str, Any]

        return Answer("accept", {"approve": self.answer})


def snapshot(t: Twin) -> tuple[Any, ...]:
    """Everything a change could touch: each entry's place, name, url, tags and secret; spaces."""
    v = t.vault
    entries = sorted(
        (e.space, e.name, e.url, tuple(sorted(e.tags)), v.reveal(e, None)[1])
        for e in v.entries.values()
    )
    return tuple(entries), tuple(sorted(v.spaces))


def _seed(v: Vault) -> None:
    v.space_add("ops")
    v.add("login", "seed", "default", [], None, None, Change({}, {"password": "old-1"}, []))
    v.add("login", "inops", "ops", [], None, None, Change({}, {"password": "old-2"}, []))


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with twin_of(tmp_path, PASSWORD, seed=_seed) as t:
        yield t


Check = Callable[[Twin], bool]


def _secret(t: Twin, name: str) -> str | None:
    e = next((e for e in t.vault.entries.values() if e.name == name), None)
    return t.vault.reveal(e, None)[1] if e is not None else None


# operation: (MCP tool, its arguments, wire params, what the vault shows once it landed)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], Check]] = {
    "entry.add": (
        "add_entry",
        {"type": "login", "name": "fresh", "secrets": {"password": NEW}, "tags": ["t"]},
        {"type": "login", "name": "fresh", "secrets": {"password": {"value": NEW}}, "tags": ["t"]},
        lambda t: _secret(t, "fresh") == NEW and t.vault.resolve("fresh").tags == ["t"],
    ),
    "entry.edit": (
        "edit_entry",
        {"entry": "seed", "secrets": {"password": NEW}, "url": "https://x.example"},
        {"ref": "seed", "secrets": {"password": {"value": NEW}}, "url": "https://x.example"},
        lambda t: _secret(t, "seed") == NEW and t.vault.resolve("seed").url == "https://x.example",
    ),
    "entry.remove": (
        "delete_entry",
        {"entry": "seed"},
        {"ref": "seed"},
        lambda t: _secret(t, "seed") is None and _secret(t, "inops") == "old-2",
    ),
    "space.add": (
        "manage_spaces",
        {"action": "create", "name": "newspace"},
        {"name": "newspace"},
        lambda t: "newspace" in t.vault.spaces,
    ),
    "space.rename": (
        "manage_spaces",
        {"action": "rename", "name": "ops", "new_name": "ops2"},
        {"name": "ops", "new_name": "ops2"},
        lambda t: "ops2" in t.vault.spaces and t.vault.resolve("inops").space == "ops2",
    ),
    "space.remove": (
        "manage_spaces",
        {"action": "remove", "name": "ops", "force": True},
        {"name": "ops", "force": True},
        lambda t: "ops" not in t.vault.spaces and _secret(t, "inops") is None,
    ),
}


def test_every_mutating_operation_is_in_the_matrix_and_every_write_tool_runs_one() -> None:
    mutating = {n for n, op in OPERATIONS.items() if op.rule.mutating}
    assert mutating == set(CASES) | {"entry.add_batch"}  # the batch: its own test below
    assert {c[0] for c in CASES.values()} | {"generate_password"} == {
        t.name
        for t in mcp_tools.TOOLS
        if not t.read_only and t.name.startswith(("add", "edit", "delete", "manage", "generate"))
    }


@pytest.mark.anyio
@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_a_wire_change_lands_only_as_its_policy_allows(
    twin: Twin, policy: str, op: str
) -> None:
    _, _, params, landed = CASES[op]
    token, _rec = twin.session(approve=policy)
    before = snapshot(twin)
    resp = await twin.wire(op, params, token=token)
    if policy == "agent":
        assert resp.ok, resp.error
        assert landed(twin)
        return
    assert not resp.ok and resp.error is not None
    assert resp.error.code == "APPROVAL_PENDING"
    assert snapshot(twin) == before
    tx_id = resp.error.data["tx_id"]
    assert NEW not in resp.model_dump_json() and NEW not in resp.error.data["preview"]
    # the session can neither approve its own change nor commit it through a tool
    own = await twin.wire("tx.approve", {"tx_id": tx_id}, token=token)
    assert not own.ok and own.error is not None and own.error.code == "PERMISSION_DENIED"
    for tool in {c[0] for c in CASES.values()}:
        body = await twin.body(_rec, tool, {"tx_id": tx_id, "approve": True})
        assert body["error"] and body["code"] == "TRANSACTION_NOT_FOUND"
    assert snapshot(twin) == before
    # the owner approves with the master password: exactly the held change lands, once
    ok = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert ok.ok, ok.error
    assert ok.result is not None and ok.result["status"] == "committed"
    assert landed(twin)
    after = snapshot(twin)
    again = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert not again.ok and again.error is not None and again.error.code == "TRANSACTION_CLOSED"
    assert snapshot(twin) == after


@pytest.mark.anyio
@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_a_tool_change_lands_only_as_its_policy_allows(
    twin: Twin, policy: str, op: str
) -> None:
    tool, args, _, landed = CASES[op]
    _, rec = twin.session(approve=policy)
    before = snapshot(twin)
    preview = await twin.body(rec, tool, args)
    assert not preview["error"] and preview["status"] == "pending", preview
    tx_id = preview["tx_id"]
    commit = {"tx_id": tx_id, "approve": True}
    if policy == "agent":
        assert (await twin.body(rec, tool, commit))["status"] == "committed"
        assert landed(twin)
        return
    if policy == "client":
        cannot = await twin.body(rec, tool, commit)  # a client that cannot ask: fail closed
        assert cannot["error"] and cannot["code"] == "PERMISSION_DENIED"
        no = FakeElicitation(answer=False)
        denied = await twin.body(rec, tool, commit, mcp=no)
        assert denied["error"] and denied["code"] == "APPROVAL_DENIED" and no.asked
        assert snapshot(twin) == before
        preview = await twin.body(rec, tool, args)
        yes = FakeElicitation(answer=True)
        done = await twin.body(rec, tool, {"tx_id": preview["tx_id"], "approve": True}, mcp=yes)
        assert done["status"] == "committed" and NEW not in yes.asked[0]
        assert landed(twin)
        return
    waiting = await twin.body(rec, tool, commit)
    assert waiting["status"] == "pending_owner_approval"
    assert snapshot(twin) == before
    ok = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert ok.ok and ok.result is not None and ok.result["status"] == "approved"
    assert snapshot(twin) == before  # a tool's transaction lands at the agent's commit
    assert (await twin.body(rec, tool, commit))["status"] == "committed"
    assert landed(twin)


@pytest.mark.anyio
async def test_a_tool_context_without_a_session_is_never_the_owner(twin: Twin) -> None:
    ctx = Context(state=twin.state, peer=twin.peer, auth=None, request_id="")
    for name in ("get_audit_logs", "manage_profiles", "list_entries", "tx_list"):
        out = await mcp_tools.run(ctx, name, {})
        assert out.is_error and out.structured["code"] == "SESSION_REQUIRED", name


@pytest.mark.anyio
async def test_a_held_change_whose_entry_changed_since_is_a_conflict_and_changes_nothing(
    twin: Twin,
) -> None:
    token, _ = twin.session(approve="owner")
    resp = await twin.wire("entry.edit", {"ref": "seed", "url": "https://a.example"}, token=token)
    assert resp.error is not None and resp.error.code == "APPROVAL_PENDING"
    owner = await twin.wire(
        "entry.edit", {"ref": "seed", "url": "https://b.example"}, password=PASSWORD
    )
    assert owner.ok
    ok = await twin.wire("tx.approve", {"tx_id": resp.error.data["tx_id"]}, password=PASSWORD)
    assert not ok.ok and ok.error is not None and ok.error.code == "TRANSACTION_CONFLICT"
    assert twin.vault.resolve("seed").url == "https://b.example"


@pytest.mark.anyio
async def test_a_held_change_of_a_revoked_session_never_lands(twin: Twin) -> None:
    token, rec = twin.session(approve="owner")
    resp = await twin.wire("space.add", {"name": "late"}, token=token)
    assert resp.error is not None and resp.error.code == "APPROVAL_PENDING"
    assert (await twin.wire("session.revoke", {"accessor": rec.accessor})).ok
    ok = await twin.wire("tx.approve", {"tx_id": resp.error.data["tx_id"]}, password=PASSWORD)
    assert not ok.ok and ok.error is not None and ok.error.code == "TRANSACTION_CONFLICT"
    assert "late" not in twin.vault.spaces


# ---------------------------------------------------------------------- #13.12 filtered admin


@pytest.mark.anyio
async def test_delegating_an_admin_session_with_an_entry_filter_is_refused(twin: Twin) -> None:
    for limit in ({"spaces": ["ops"]}, {"tags": ["t"]}, {"entries": ["seed*"]}):
        params = {"scope": "admin", "ttl_seconds": 3600, **limit}
        resp = await twin.wire("session.create", params, password=PASSWORD)
        assert resp.error is not None and resp.error.code == "INVALID_PARAMETERS", limit
    ok = await twin.wire(
        "session.create",
        {"scope": "write", "ttl_seconds": 3600, "spaces": ["ops"]},
        password=PASSWORD,
    )
    assert ok.ok, ok.error


@pytest.mark.anyio
async def test_a_filtered_admin_session_from_an_older_vault_sees_no_audit_sessions_or_history(
    twin: Twin,
) -> None:
    from broker.core.sessions import EntryFilter

    spec = CreateSpec(
        label="old", scope="admin", ttl=timedelta(hours=1), filter=EntryFilter(spaces=["ops"])
    )
    token, rec = twin.state.sessions().create(spec)
    await twin.wire("entry.show", {"ref": "seed"}, password=PASSWORD)  # an audit record outside
    for method in ("audit.list", "session.list", "request.list", "profile.show"):
        resp = await twin.wire(method, {}, token=token)
        assert resp.error is not None and resp.error.code == "PERMISSION_DENIED", method
    for tool, args in (
        ("get_audit_logs", {}),
        ("get_history", {"entry": "inops"}),
        ("tx_list", {}),
    ):
        body = await twin.body(rec, tool, args)
        assert body["error"] and body["code"] == "PERMISSION_DENIED", tool
    # inside its filter it still works as a write session would
    body = await twin.body(rec, "list_entries", {})
    assert [e["name"] for e in body["entries"]] == ["inops"]


# ---------------------------------------------------------------------- tool schemas


@pytest.mark.anyio
async def test_an_oversized_secret_is_refused_naming_the_tools_own_field(twin: Twin) -> None:
    _, rec = twin.session("admin")
    big = "x" * (64 * 1024 + 1)
    body = await twin.body(
        rec, "add_entry", {"type": "login", "name": "n", "secrets": {"password": big}}
    )
    assert body["error"] and body["code"] == "INVALID_PARAMETERS"
    assert body["data"]["fields"] == ["secrets.password"]
    schema = next(t for t in mcp_tools.TOOLS if t.name == "add_entry").to_mcp().input_schema
    secrets = schema["properties"]["secrets"]
    assert (secrets["maxProperties"], secrets["additionalProperties"]["maxLength"]) == (64, 65536)


def _oversized(prop: dict[str, Any]) -> Any:
    kinds = {prop.get("type")} | {a.get("type") for a in prop.get("anyOf", [])}
    if "string" in kinds:
        return "y" * (64 * 1024 + 1)
    if "object" in kinds:
        return {"k": "y" * (64 * 1024 + 1)}
    if "array" in kinds:
        return ["y" * 300]
    return None


@pytest.mark.anyio
async def test_every_refused_tool_argument_names_a_field_of_that_tools_schema(twin: Twin) -> None:
    _, rec = twin.session("admin")
    checked = 0
    for spec in mcp_tools.TOOLS:
        schema = spec.to_mcp().input_schema
        for name, prop in schema.get("properties", {}).items():
            value = _oversized(prop)
            if value is None:
                continue
            body = await twin.body(rec, spec.name, {name: value})
            if not body["error"] or body["code"] != "INVALID_PARAMETERS":
                continue
            named = {f.split(".")[0] for f in body.get("data", {}).get("fields", [])}
            assert named <= set(schema["properties"]), (spec.name, name, named)
            checked += 1
    assert checked > 20


def test_the_operation_table_names_real_tools_and_each_write_tool_runs_mutating_ones() -> None:
    by_tool: dict[str, set[str]] = {}
    for op in [*OPERATIONS.values(), *TOOL_OPERATIONS.values()]:
        for tool in op.tools:
            assert tool in mcp_tools.TOOLS_BY_NAME, (op.name, tool)
            by_tool.setdefault(tool, set()).add(op.name)
    changing = {
        t.name
        for t in mcp_tools.TOOLS
        if t.scope in ("write", "admin") and not t.read_only and not t.name.startswith("tx_")
    }
    # cloud_sync changes no vault data: it runs sync.status / sync.now (write scope)
    changing.discard("cloud_sync")
    assert len(changing) == 7
    for tool in changing:
        assert by_tool.get(tool), tool
        ops = [OPERATIONS.get(o) or TOOL_OPERATIONS[o] for o in by_tool[tool]]
        assert all(op.rule.mutating for op in ops), tool
    # a rule's audit class and mutating flag are consistent: every change leaves an attempt
    every = [*OPERATIONS.values(), *TOOL_OPERATIONS.values()]
    assert all(op.rule.audit == "change" for op in every if op.rule.mutating)


# ------------------------------------------- changes only a tool proposes (plugin, sync config)


def test_the_changes_only_a_tool_proposes_are_declared_operations_in_this_matrix() -> None:
    mutating = {n for n, op in TOOL_OPERATIONS.items() if op.rule.mutating}
    assert mutating == {"plugin.enable", "sync.configure"}  # each has its test below
    assert not set(TOOL_OPERATIONS) & set(OPERATIONS)


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_a_plugin_is_enabled_only_after_the_owner_approved_whatever_the_policy(
    twin: Twin, policy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.plugin_state import read_enabled

    from .test_plugins import install_demo

    install_demo(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("APM_HOME", str(tmp_path / "home"))
    token, rec = twin.session(approve=policy)
    # no wire method reaches it: a raw frame is an unknown method, for a session or the owner
    for creds in ({"token": token}, {"password": PASSWORD}):
        raw = await twin.wire("plugin.enable", {"distribution": "apm-demo-plugin"}, **creds)
        assert raw.error is not None and raw.error.code == "INVALID_PARAMETERS"
    shown = await twin.body(rec, "install_plugin", {"distribution": "apm-demo-plugin"})
    assert shown["status"] == "pending" and shown["policy"] == "owner", shown
    commit = {"tx_id": shown["tx_id"], "approve": True}
    waiting = await twin.body(rec, "install_plugin", commit, mcp=FakeElicitation(answer=True))
    assert waiting["status"] == "pending_owner_approval"  # the client's yes is not enough
    assert read_enabled() == set()
    own = await twin.wire("tx.approve", {"tx_id": shown["tx_id"]}, token=token)
    assert own.error is not None and own.error.code == "PERMISSION_DENIED"
    ok = await twin.wire("tx.approve", {"tx_id": shown["tx_id"]}, password=PASSWORD)
    assert ok.ok and ok.result is not None and ok.result["status"] == "approved"
    assert read_enabled() == set()  # it lands at the agent's commit
    done = await twin.body(rec, "install_plugin", commit)
    assert done["status"] == "committed", done
    assert read_enabled() == {"importer.demo", "importer.broken"}


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_a_sync_endpoint_change_reaches_its_operation_only_after_the_owner_approved(
    twin: Twin, policy: str
) -> None:
    _, rec = twin.session("admin", approve=policy)
    args = {"action": "set_endpoints", "endpoints": ["http://127.0.0.1:2379"]}
    shown = (await twin.body(rec, "cloud_config", args))["change"]
    assert shown["status"] == "pending" and shown["policy"] == "owner", shown
    commit = {"tx_id": shown["tx_id"], "approve": True}
    waiting = await twin.body(rec, "cloud_config", commit, mcp=FakeElicitation(answer=True))
    assert waiting["change"]["status"] == "pending_owner_approval"
    ok = await twin.wire("tx.approve", {"tx_id": shown["tx_id"]}, password=PASSWORD)
    assert ok.ok, ok.error
    # approved, the commit runs sync.configure's handler: this vault syncs no space
    done = await twin.body(rec, "cloud_config", commit)
    assert done["error"] and done["code"] == "INVALID_PARAMETERS"
    assert "syncs no space" in done["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_a_batch_add_of_a_human_approved_session_never_lands(twin: Twin, policy: str) -> None:
    token, _ = twin.session(approve=policy)
    before = snapshot(twin)
    item = {"type": "login", "name": "batched", "secrets": {"password": {"value": NEW}}}
    resp = await twin.wire("entry.add_batch", {"entries": [item]}, token=token)
    if policy == "agent":
        assert resp.ok, resp.error
        assert _secret(twin, "batched") == NEW
        return
    # not held yet (a batch has no preview): refused, fail closed, nothing lands
    assert not resp.ok and resp.error is not None
    assert snapshot(twin) == before


# ------------------------------------------- tools as thin adapters over operations (#12.2)


def test_admin_request_and_tx_tools_run_one_operation_whose_rule_matches_their_catalog_entry() -> (
    None
):
    thin = {
        "get_audit_logs", "get_history", "manage_profiles", "request_access",
        "get_request_status", "get_access_details", "list_my_requests", "tx_status", "tx_list",
        "tx_abort",
    }  # fmt: skip
    by_name = mcp_tools.TOOLS_BY_NAME
    assert {name for name, spec in by_name.items() if spec.op is not None} >= thin
    for spec in mcp_tools.TOOLS:
        if spec.op is None:
            continue
        op = OPERATIONS.get(spec.op) or TOOL_OPERATIONS[spec.op]
        assert spec.name in op.tools, spec.name
        # the published schemas are the operation's models; the catalog's scope is the gate's
        assert (spec.args, spec.out) == (op.params, op.result), spec.name
        assert op.rule.scope == spec.scope and spec.run is None, spec.name


@pytest.mark.anyio
async def test_a_session_lacking_a_thin_tools_scope_is_refused_by_the_gate_and_the_denial_kept(
    twin: Twin,
) -> None:
    _, rec = twin.session("read")
    for tool, args in (("get_audit_logs", {}), ("tx_list", {}), ("tx_status", {"tx_id": "tx_x"})):
        body = await twin.body(rec, tool, args)
        assert body["error"] and body["code"] == "PERMISSION_DENIED", tool
    # refused by the gate, as a wire method would be: `apm session why` can show it
    reasons = [d.reason for d in twin.state.sessions().denials[rec.accessor]]
    assert reasons == ["scope read lacks admin", "scope read lacks admin", "scope read lacks write"]


# ------------------------------------------- write tools reach a change only through the gate


class GateSpy:
    """Which changes the gate's approval step let run: (operation, transaction) per pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passed: list[tuple[str, str | None]] = []
        real = dispatch._approval_gate

        async def spy(ctx: Context, op: Any, params: Any, tx: Any, proposal: Any) -> None:
            await real(ctx, op, params, tx, proposal)  # raises when the change may not run
            self.passed.append((op.name, tx.tx_id if tx is not None else None))

        monkeypatch.setattr(dispatch, "_approval_gate", spy)


# a write tool's change -> (the operation it lands as, what the vault shows once it landed)
TOOL_CASES: dict[str, tuple[str, dict[str, Any], str, Check]] = {
    **{op: (c[0], c[1], op, c[3]) for op, c in CASES.items()},
    "generate_password": (
        "generate_password",
        {"entry": "seed", "length": 32},
        "entry.edit",
        lambda t: len(_secret(t, "seed") or "") == 32,
    ),
}


async def _tool_change_problems(twin: Twin, spy: GateSpy, case: str, policy: str) -> list[str]:
    """Run a write tool's two phases under `policy`; what went wrong about the gate (empty:
    nothing ran at the preview, and the commit landed after exactly one approval pass)."""
    tool, args, op, landed = TOOL_CASES[case]
    _, rec = twin.session(approve=policy)
    before = snapshot(twin)
    problems = []
    shown = await twin.body(rec, tool, args)
    if shown["error"] or snapshot(twin) != before or spy.passed:
        problems.append(f"the preview ran something: {spy.passed}")
    tx_id = shown.get("tx_id")
    if policy == "owner":
        ok = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
        assert ok.ok, ok.error
    spy.passed.clear()
    mcp = FakeElicitation(answer=True) if policy == "client" else None
    done = await twin.body(rec, tool, {"tx_id": tx_id, "approve": True}, mcp=mcp)
    if done.get("status") != "committed" or not landed(twin):
        problems.append(f"the commit did not land: {done}")
    if spy.passed != [(op, tx_id)]:
        problems.append(f"it landed past the gate's approval step: {spy.passed}")
    return problems


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(TOOL_CASES))
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_a_write_tools_change_lands_only_after_the_gates_approval_step(
    twin: Twin, monkeypatch: pytest.MonkeyPatch, case: str, policy: str
) -> None:
    spy = GateSpy(monkeypatch)
    assert await _tool_change_problems(twin, spy, case, policy) == []


@pytest.mark.anyio
async def test_a_planted_bypass_of_the_approval_step_is_caught(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = GateSpy(monkeypatch)
    real = dispatch.invoke

    async def bypass(ctx: Context, op: Any, params: Any, **kw: Any) -> Any:
        if kw.get("tx") is not None:  # a commit that calls the handler itself
            return await op.handler(ctx, params)
        return await real(ctx, op, params, **kw)

    monkeypatch.setattr(dispatch, "invoke", bypass)
    problems = await _tool_change_problems(twin, spy, "entry.edit", "agent")
    assert problems and "past the gate" in problems[-1]


def _minimal_args(schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments that pass a tool's validation: each required property with a plain value."""
    out: dict[str, Any] = {}
    for name in schema.get("required", []):
        prop = schema["properties"][name]
        kinds = {prop.get("type")} | {a.get("type") for a in prop.get("anyOf", [])}
        out[name] = 1 if "integer" in kinds else "x" * max(10, prop.get("minLength", 0))
    return out


@pytest.mark.anyio
async def test_every_tool_is_refused_by_the_gate_without_a_session_or_the_scope_it_needs(
    twin: Twin,
) -> None:
    """One place decides who may run a tool: a session-less call is never the owner, and a
    session lacking a tool's scope is refused by the gate (which keeps the denial), whether
    the tool is one operation or a runner over several."""
    nobody = Context(state=twin.state, peer=twin.peer, auth=None, request_id="")
    denials = twin.state.sessions().denials
    sessions = {scope: twin.session(scope)[1] for scope in ("read", "secrets", "write")}
    checked = 0
    for spec in mcp_tools.TOOLS:
        args = _minimal_args(spec.to_mcp().input_schema)
        if spec.grantable:  # an entry that exists: only the missing grant refuses it
            args["entry"] = "seed"
        out = await mcp_tools.run(nobody, spec.name, args)
        assert out.is_error and out.structured["code"] == "SESSION_REQUIRED", spec.name
        for scope, rec in sessions.items():
            if scope_rank(scope) >= scope_rank(spec.scope):
                continue
            kept = len(denials.get(rec.accessor, []))
            body = await twin.body(rec, spec.name, args)
            assert body["error"] and body["code"] == "PERMISSION_DENIED", (spec.name, scope)
            if spec.grantable:  # no grant: refused by the grant check, not as a denial
                continue
            reasons = [d.reason for d in denials.get(rec.accessor, [])][kept:]
            assert reasons == [f"scope {scope} lacks {spec.scope}"], (spec.name, scope)
            checked += 1
    assert checked > 20


def test_only_the_gate_runs_a_handler_or_decides_a_scope() -> None:
    """A second scope check or a direct handler call is the start of a second gate."""
    root = Path(__file__).resolve().parents[1] / "broker"
    gate = {root / "server" / "dispatch.py", root / "server" / "operations.py"}
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "require_scope" not in text, path
        if path not in gate:
            assert ".handler(" not in text, path
            assert "filtered_admin" not in text and "_check_scope" not in text, path


def test_a_transactions_state_changes_only_in_core_transactions() -> None:
    """The state machine lives in `core/transactions.py`: no `tx.state = ...` in the server."""
    import ast

    root = Path(__file__).resolve().parents[1] / "broker" / "server"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AugAssign | ast.AnnAssign)
                else []
            )
            for t in targets:
                owner = t.value if isinstance(t, ast.Attribute) else None
                if isinstance(t, ast.Attribute) and t.attr in ("state", "receipt"):
                    assert isinstance(owner, ast.Name) and owner.id == "self", (path, t.lineno)


@pytest.mark.anyio
async def test_a_tool_running_a_mutating_operation_without_a_preview_is_refused_by_the_gate(
    twin: Twin,
) -> None:
    """Even for an `agent` session: a tool's change is a previewed transaction or nothing."""
    _, rec = twin.session(approve="agent")
    ctx = Context(state=twin.state, peer=twin.peer, auth=None, request_id="", session=rec)
    ctx.via = "mcp"  # as mcp_tools.run sets it for every tool call
    before = snapshot(twin)
    for name in sorted(CASES):
        op = OPERATIONS[name]
        params = op.params.model_validate(CASES[name][2])
        with pytest.raises(ApmError) as refused:
            await dispatch.invoke(ctx, op, params)
        assert refused.value.code == "PERMISSION_DENIED", name
    assert snapshot(twin) == before


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["tool", "wire"])
async def test_the_commit_record_naming_tx_and_receipt_precedes_the_change_or_nothing_runs(
    twin: Twin, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    token, rec = twin.session(approve="agent" if path == "tool" else "owner")
    change = {"entry": "seed", "url": "https://c.example"}
    if path == "tool":
        tx_id = (await twin.body(rec, "edit_entry", change))["tx_id"]
    else:
        held = await twin.wire("entry.edit", {"ref": "seed", "url": change["url"]}, token=token)
        assert held.error is not None
        tx_id = held.error.data["tx_id"]
    audit = twin.state.audit
    assert audit is not None
    real, seen = audit.append, []

    def failing(event: str, **fields: Any) -> Any:
        if event == "tx.commit":
            seen.append((fields.get("tx"), fields.get("receipt"), twin.vault.resolve("seed").url))
            raise StorageError()
        return real(event, **fields)

    monkeypatch.setattr(audit, "append", failing)
    if path == "tool":
        body = await twin.body(rec, "edit_entry", {"tx_id": tx_id, "approve": True})
        code = body["code"] if body["error"] else "OK"
    else:
        resp = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
        code = resp.error.code if resp.error is not None else "OK"
    assert code == "STORAGE_ERROR"
    (named_tx, receipt, url_then), *_ = seen
    assert named_tx == tx_id and str(receipt).startswith("rcpt_") and url_then is None
    assert twin.vault.resolve("seed").url is None  # refused: nothing changed
