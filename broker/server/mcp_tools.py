"""The MCP tool catalog: names, descriptions for a model, schemas, annotations, required scope.

Rules:
- Tool names are a public contract.
- Every tool validates its arguments with a pydantic model (the low-level SDK server does not).
- Tools run the same handlers as the wire methods, with the session in the context, so scopes
  and entry filters apply identically on both paths.
- Failures are tool results (`isError`) with the code in the text ("Error CODE: ... Fix: ...")
  and {code, message, hint, data} in `_meta["apm/error"]`, never in `structuredContent`: TS SDK
  clients validate that against the tool's outputSchema even on errors (-32602 otherwise).
  Nothing raised in a tool reaches the client as a protocol error or a traceback.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import mcp.types as types
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.core.sessions import scope_rank, scopes_up_to
from broker.core.vault import construct
from broker.wire import fastjson
from broker.wire.entries import ENTRY_TYPE_NAMES, EntryMeta, EntryType
from broker.wire.errors import ApmError, InternalError, PermissionDenied
from broker.wire.protocol import (
    EntryGetParams,
    EntryListParams,
    EntryRef,
    EntrySearchParams,
    SearchHit,
    SpaceInfo,
    TotpResult,
)

from . import handlers  # noqa: F401 - declares the operations these tools run
from .admin_tools import ADMIN_TOOLS
from .context import Context
from .dispatch import invoke, to_wire_error
from .handlers import shown_json
from .operations import OPERATIONS, Rule, find, tool_operation
from .plugin_tools import PLUGIN_TOOLS
from .request_tools import REQUEST_TOOLS
from .sync_tools import SYNC_TOOLS
from .tool_args import FieldName, Space, Tag
from .tool_base import Args, Shaped, ToolSpec
from .write_tools import WRITE_TOOLS

log = logging.getLogger("apm.broker.mcp")


class ListEntriesArgs(Args):
    space: Space | None = Field(default=None, description="only this space")
    type: EntryType | None = Field(default=None, description="only this entry type")
    tag: Tag | None = Field(default=None, description="only entries with this tag")
    offset: int = Field(default=0, ge=0, description="skip this many (for paging)")
    limit: int = Field(default=50, ge=1, le=500, description="page size")


class ListEntriesOut(BaseModel):
    entries: list[EntryMeta]
    total: int
    offset: int
    next_offset: int | None


class SearchEntriesArgs(Args):
    query: str = Field(min_length=1, max_length=256, description="words to look for")
    space: Space | None = None
    type: EntryType | None = None
    tag: Tag | None = None
    limit: int = Field(default=20, ge=1, le=100)


class SearchEntriesOut(BaseModel):
    hits: list[SearchHit]


class EntryArgs(Args):
    entry: str = Field(min_length=1, max_length=200, description="entry id or name")
    space: Space | None = Field(default=None, description="space, if the name is ambiguous")


class GetEntryArgs(EntryArgs):
    # frozen: a validated instance is shared by every call with the same arguments (`_args`)
    model_config = ConfigDict(extra="forbid", frozen=True)

    include_secret: bool = Field(
        default=False, description="also return the secret value (needs the secrets scope)"
    )
    field: FieldName | None = Field(
        default=None, description="which secret field (default: main one)"
    )


class SecretField(BaseModel):
    field: str
    value: str


class GetEntryOut(BaseModel):
    entry: EntryMeta
    secret: SecretField | None = None


class DecryptEntryArgs(EntryArgs):
    field: FieldName | None = Field(
        default=None, description="which field (default: the main secret)"
    )


class DecryptEntryOut(BaseModel):
    id: str
    name: str
    field: str
    value: str


class TotpOut(TotpResult):  # the wire's result, under the tool's published name
    pass


class AssistArgs(Args):
    question: str | None = Field(
        default=None,
        max_length=1000,
        description="optional: what you need, in words (e.g. 'deploy to the staging database'); "
        "the answer then ranks the entries that fit, what access each needs and the exact "
        "request to make",
    )


class AssistRequest(BaseModel):
    tool: str
    arguments: dict[str, Any]


class AssistCandidate(BaseModel):
    entry: EntryMeta
    score: float
    access: str  # "available", "granted", "pending" or "request"
    access_needed: str  # in words: what this session needs to use the entry
    request: AssistRequest | None  # the exact call to make next (None: nothing to ask for)


class SpaceCount(SpaceInfo):  # the wire's space.list item
    pass


class AssistOut(BaseModel):
    accessor: str
    label: str
    scopes: list[str]
    expires_at: datetime
    bindings: dict[str, Any]
    entry_filter: dict[str, list[str]]
    total_entries: int
    spaces: list[SpaceCount]
    types: dict[str, int]
    tools_available: list[str]
    needs_more_access: dict[str, str]
    how_to_get_more_access: str
    question: str | None = None
    candidates: list[AssistCandidate] | None = None  # with `question`: best first


# ------------------------------------------------------------------ tool bodies


_ENTRY_SHOW = OPERATIONS["entry.show"]


async def _op(ctx: Context, name: str, params: BaseModel) -> Any:
    """Run the operation `name` through the one gate (scope, filter, grants, approval)."""
    return await invoke(ctx, OPERATIONS[name], params)


async def _list_entries(ctx: Context, a: ListEntriesArgs) -> ListEntriesOut:
    res = await _op(
        ctx,
        "entry.list",
        EntryListParams(space=a.space, type=a.type, tag=a.tag, offset=a.offset, limit=a.limit),
    )
    nxt = a.offset + len(res.entries)
    return ListEntriesOut(
        entries=res.entries,
        total=res.total,
        offset=a.offset,
        next_offset=nxt if nxt < res.total else None,
    )


async def _search_entries(ctx: Context, a: SearchEntriesArgs) -> SearchEntriesOut:
    res = await _op(
        ctx,
        "entry.search",
        EntrySearchParams(query=a.query, space=a.space, type=a.type, tag=a.tag, limit=a.limit),
    )
    return SearchEntriesOut(hits=res.hits)


async def _get_entry(ctx: Context, a: GetEntryArgs) -> Shaped:
    """GetEntryOut in its JSON shape, built without the model: the entry's metadata as JSON
    comes from `_entry_doc` (once per stored entry), the rest is written around it."""
    # `a` was validated against the tool's schema, whose limits are EntryRef's (a test holds
    # them equal): built without a second validation
    ref = construct(EntryRef, {"ref": a.entry, "space": a.space})
    shown: Any = await invoke(ctx, _ENTRY_SHOW, ref)  # (`_op` without its coroutine)
    meta = shown.entry
    doc, text = _entry_doc(ctx, meta)
    if not a.include_secret:
        return Shaped({"entry": doc, "secret": None}, f'{{"entry":{text},"secret":null}}')
    # without the secrets scope, a live grant for the entry opens it (the gate decides)
    got = await _op(ctx, "entry.get", EntryGetParams(ref=meta.id, field=a.field))
    secret = {"field": got.field, "value": got.value.get_secret_value()}
    return Shaped(
        {"entry": doc, "secret": secret}, f'{{"entry":{text},"secret":{_COMPACT(secret)}}}'
    )


def _entry_doc(ctx: Context, meta: EntryMeta) -> tuple[dict[str, Any], str]:
    """`meta`'s JSON shape and compact text, once per stored entry (`handlers.shown_json`)."""
    return shown_json(ctx.state.cache.get(), meta, _COMPACT)


async def _decrypt_entry(ctx: Context, a: DecryptEntryArgs) -> DecryptEntryOut:
    got = await _op(ctx, "entry.get", EntryGetParams(ref=a.entry, space=a.space, field=a.field))
    return DecryptEntryOut(
        id=got.id, name=got.name, field=got.field, value=got.value.get_secret_value()
    )


async def _get_totp(ctx: Context, a: EntryArgs) -> TotpOut:
    res = await _op(ctx, "entry.totp", EntryRef(ref=a.entry, space=a.space))
    return TotpOut(**res.model_dump())


_STOP_WORDS = frozenset(
    {
        "the", "a", "an", "and", "or", "of", "to", "for", "in", "on", "at", "with", "from",
        "into", "my", "our", "your", "this", "that", "need", "needs", "want", "access", "use",
        "using", "get", "give", "me", "please", "some", "which", "what", "where", "how", "can",
        "could", "should", "would", "credential", "credentials", "secret", "secrets", "password",
        "passwords", "key", "keys", "token", "login",
    }
)  # fmt: skip


async def _candidates(ctx: Context, question: str, limit: int = 5) -> list[AssistCandidate]:
    """Entries that fit a free-text question, best first: one search per meaningful word
    (through the gate, so the session's filter applies), scores summed."""
    words: list[str] = []
    for w in re.findall(r"[\w.@-]{2,}", question.lower()):
        if w not in _STOP_WORDS and w not in words:
            words.append(w[:256])
    scores: dict[str, float] = {}
    metas: dict[str, EntryMeta] = {}
    for w in words[:8]:
        res = await _op(ctx, "entry.search", EntrySearchParams(query=w, limit=20))
        for hit in res.hits:
            scores[hit.entry.id] = scores.get(hit.entry.id, 0.0) + hit.score
            metas[hit.entry.id] = hit.entry
    ranked = sorted(scores, key=lambda i: (-scores[i], metas[i].name))[:limit]
    rec = ctx.session
    if rec is None:
        raise PermissionDenied("assist describes a session; no session is attached")
    now = ctx.state.clock()
    mine = ctx.state.requests().listing(rec.accessor)
    minutes = min(30, ctx.state.request_max_minutes)
    why = question.strip()
    justification = (why if len(why) >= 10 else f"needed for: {why or 'the current task'}")[:1000]
    out = []
    for eid in ranked:
        meta = metas[eid]
        live = [r for r in mine if r.entry_id == eid and r.status(now) in ("approved", "pending")]
        approved = next((r for r in live if r.status(now) == "approved"), None)
        pending = next((r for r in live if r.status(now) == "pending"), None)
        if scope_rank(rec.scope) >= scope_rank("secrets"):
            access, needed, req = (
                "available",
                "nothing more: this session's secrets scope covers it (prefer apm run)",
                None,
            )
        elif approved is not None:
            access, needed = "granted", f"nothing more: granted until {approved.expires_at}"
            req = AssistRequest(tool="get_access_details", arguments={"request_id": approved.id})
        elif pending is not None:
            access, needed = "pending", "a request is waiting for the person's decision"
            req = AssistRequest(tool="get_request_status", arguments={"request_id": pending.id})
        else:
            access = "request"
            needed = (
                "a just-in-time grant: metadata is visible, the secret needs the person's "
                "approval (or the secrets scope)"
            )
            req = AssistRequest(
                tool="request_access",
                arguments={
                    "entry": meta.id,
                    "space": meta.space,
                    "duration_minutes": minutes,
                    "justification": justification,
                },
            )
        out.append(
            AssistCandidate(
                entry=meta,
                score=round(scores[eid], 4),
                access=access,
                access_needed=needed,
                request=req,
            )
        )
    return out


# every session may describe itself; the tool call is audited by its caller
DESCRIBE = Rule(unlocked=True, scope="read", audit="none")


@tool_operation("session.assist", AssistArgs, AssistOut, DESCRIBE, ("assist",))
async def _assist(ctx: Context, a: AssistArgs) -> AssistOut:
    from .session_handlers import session_info

    rec = ctx.session
    if rec is None:
        raise PermissionDenied("assist describes a session; no session is attached")
    vault = ctx.state.cache.get()
    visible = list(vault.iter_entries(visible=ctx.visible))
    spaces: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for e in visible:
        spaces[e.space] = spaces.get(e.space, 0) + 1
        kinds[e.type] = kinds.get(e.type, 0) + 1
    info = session_info(rec, ctx.state)
    rank = scope_rank(rec.scope)
    return AssistOut(
        accessor=rec.accessor,
        label=rec.label,
        scopes=scopes_up_to(rec.scope),
        expires_at=rec.expires_at,
        bindings=info.bindings,
        entry_filter=info.filter,
        total_entries=len(visible),
        spaces=[SpaceCount(name=k, entries=v) for k, v in sorted(spaces.items())],
        types={
            t: kinds[t]
            for t in (*ENTRY_TYPE_NAMES, *sorted(set(kinds) - set(ENTRY_TYPE_NAMES)))
            if t in kinds
        },  # plugins' types after the built-ins
        tools_available=[t.name for t in TOOLS if scope_rank(t.scope) <= rank],
        needs_more_access={t.name: t.scope for t in TOOLS if scope_rank(t.scope) > rank},
        how_to_get_more_access=(
            "Secret values and writes need a wider session. Ask the person to run "
            '"apm delegate --scope secrets" (or write/admin) and give the client the new '
            "APM_EPHEMERAL_ID; never ask them to paste a password into the chat. For one "
            "entry, request_access asks for a time-limited grant instead."
        ),
        question=a.question,
        candidates=await _candidates(ctx, a.question) if a.question is not None else None,
    )


READ_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="list_entries",
        title="List vault entries",
        description=(
            "List the credentials stored in the person's apm vault: names, types, spaces, tags, "
            "usernames and URLs, never secret values. Paged with offset/limit; filter by space, "
            "type or tag. Use search_entries to find something by name."
        ),
        scope="read",
        args=ListEntriesArgs,
        out=ListEntriesOut,
        run=_list_entries,
    ),
    ToolSpec(
        name="search_entries",
        title="Search vault entries",
        description=(
            "Fuzzy search over entry names, usernames, URLs, tags and non-secret notes; results "
            "are ranked best first and carry metadata only. Secret values are never searched."
        ),
        scope="read",
        args=SearchEntriesArgs,
        out=SearchEntriesOut,
        run=_search_entries,
    ),
    ToolSpec(
        name="get_entry",
        title="Get one entry",
        description=(
            "Get one entry's metadata by id or name. With include_secret=true also its main "
            "secret value (or `field`), which needs the secrets scope."
        ),
        scope="read",
        args=GetEntryArgs,
        out=GetEntryOut,
        run=_get_entry,
    ),
    ToolSpec(
        name="assist",
        title="What can this session do",
        description=(
            "Describe this apm session: its scopes, bindings and expiry, what the vault holds "
            "(spaces, entry types, counts) and which tools need more access. Call it first. "
            "With `question` (what you need, in words) it also ranks the entries that fit, says "
            "what access each needs and gives the exact request_access call to make."
        ),
        scope="read",
        args=AssistArgs,
        out=AssistOut,
        op="session.assist",
    ),
    ToolSpec(
        name="decrypt_entry",
        title="Reveal a secret value",
        description=(
            "Return the secret value of an entry (its main secret, or `field`). Use the value "
            "only for the task at hand and never repeat it back to the person unasked. On a use "
            "grant (request_access's default) this is refused: call get_access_details and run "
            "its `apm run` command instead."
        ),
        scope="secrets",
        args=DecryptEntryArgs,
        out=DecryptEntryOut,
        run=_decrypt_entry,
        grantable=True,
    ),
    ToolSpec(
        name="get_totp",
        title="Current TOTP code",
        description=(
            "The current one-time code of a TOTP entry and the seconds it stays valid. Needs "
            "the secrets scope or a reveal grant; a use grant does not give codes to you."
        ),
        scope="secrets",
        args=EntryArgs,
        out=TotpOut,
        run=_get_totp,
        idempotent=False,
        grantable=True,
    ),
)
TOOLS: tuple[ToolSpec, ...] = (
    READ_TOOLS + REQUEST_TOOLS + WRITE_TOOLS + PLUGIN_TOOLS + ADMIN_TOOLS + SYNC_TOOLS
)
TOOLS_BY_NAME = {t.name: t for t in TOOLS}
# answered on the relay's fast path: they never talk back to the client (no elicitation)
# (request_access is not: it offers the approval page by URL elicitation)
FAST_TOOLS = (
    frozenset(t.name for t in READ_TOOLS + REQUEST_TOOLS + ADMIN_TOOLS) | {"apm_status"}
) - {"request_access"}


# ------------------------------------------------------------------ tool names

# Seed-compatible names: Apono Assist's names for the just-in-time tools. A naming is a
# layer over the same specs: one set is exposed at a time (the other set's names are unknown
# tools) and every hint, description and next step names the active set.
APONO_NAMES = {
    "request_access": "user_create_request",
    "get_request_status": "user_get_request_status",
    "get_access_details": "user_get_access_details",
    "assist": "user_apono_assist",
}
TOOL_NAMINGS: dict[str, dict[str, str]] = {"apm": {}, "apono": APONO_NAMES}
FAST_TOOLS |= frozenset(APONO_NAMES[n] for n in FAST_TOOLS if n in APONO_NAMES)
_INTERNAL = {n: {v: k for k, v in m.items()} for n, m in TOOL_NAMINGS.items()}
_MENTION = re.compile(r"\b(" + "|".join(APONO_NAMES) + r")\b")
# answers' fields that carry words for the model (never user data such as justifications)
_TEXT_KEYS = frozenset({"next_step", "note", "how_to_get_more_access", "hint"})


def public_name(name: str, naming: str) -> str:
    return TOOL_NAMINGS.get(naming, {}).get(name, name)


def spec_for(name: str, naming: str) -> ToolSpec | None:
    """The spec a public tool name runs under `naming`; the other set's names are unknown."""
    names = TOOL_NAMINGS.get(naming, {})
    if name in names:  # an internal name the naming replaced
        return None
    return TOOLS_BY_NAME.get(_INTERNAL.get(naming, {}).get(name, name))


def rename_text(text: str, naming: str) -> str:
    names = TOOL_NAMINGS.get(naming)
    if not names or not text:
        return text
    return _MENTION.sub(lambda m: names.get(m.group(1), m.group(1)), text)


def _rename_doc(value: Any, naming: str, key: str = "") -> Any:
    if isinstance(value, dict):
        if key == "needs_more_access":
            return {public_name(k, naming): v for k, v in value.items()}
        out = {k: _rename_doc(v, naming, k) for k, v in value.items()}
        if key == "request" and isinstance(out.get("tool"), str):  # an assist candidate's call
            out["tool"] = public_name(out["tool"], naming)
        return out
    if isinstance(value, list):
        if key == "tools_available":
            return [public_name(v, naming) if isinstance(v, str) else v for v in value]
        return [_rename_doc(v, naming, key) for v in value]
    if isinstance(value, str) and key in _TEXT_KEYS:
        return rename_text(value, naming)
    return value


def tools_for(scope: str, has_grant: bool = False, naming: str = "apm") -> list[types.Tool]:
    """The tools a session sees: its scope's, plus grantable ones while it holds a grant."""
    rank = scope_rank(scope)
    tools = [t for t in TOOLS if scope_rank(t.scope) <= rank or (has_grant and t.grantable)]
    if not TOOL_NAMINGS.get(naming):
        return [t.to_mcp() for t in tools]
    out = []
    for t in tools:
        tool = t.to_mcp()
        tool.name = public_name(t.name, naming)
        tool.description = rename_text(t.description, naming)
        out.append(tool)
    return out


# the hot path's encoders, built once: json.dumps with non-default arguments builds a new
# encoder per call; a str alone is what json.dumps(text) gives (ASCII-escaped)
_COMPACT = fastjson.encoder(ensure_ascii=False)
_STRING = json.encoder.encode_basestring_ascii

ERROR_META = "apm/error"  # _meta key of an error result's {code, message, hint, data}


@dataclass(frozen=True, slots=True)
class Outcome:
    """A tool call's result before it becomes an SDK model: the hot path serializes it straight
    to JSON (a CallToolResult built and dumped by pydantic cost more than the tool)."""

    structured: dict[str, Any]
    text: str  # for the model: a sentence, or the structured content as JSON
    is_error: bool
    structured_json: str | None = None  # `structured` already serialized (compact), if it is

    def to_mcp(self) -> types.CallToolResult:
        if self.is_error:  # no structuredContent: it would not match the tool's outputSchema
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=self.text)],
                is_error=True,
                meta={ERROR_META: self.structured},
            )
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=self.text)],
            structured_content=self.structured,
            is_error=False,
        )

    def json_body(self, extra: str = "") -> bytes:
        """The CallToolResult as compact JSON; `extra` (`,"key":value…`) goes inside it."""
        structured = self.structured_json or _COMPACT(self.structured)
        flag = "true" if self.is_error else "false"
        text = f'{{"content":[{{"type":"text","text":{_STRING(self.text)}}}],'
        if self.is_error:  # as in to_mcp: no structuredContent, the error in `_meta`
            body = f'{text}"isError":{flag}{_with_error_meta(extra, structured)}}}'
        else:
            body = f'{text}"structuredContent":{structured},"isError":{flag}{extra}}}'
        try:
            return body.encode()
        except UnicodeEncodeError:  # a lone surrogate in stored text: escape everything
            doc = self.to_mcp().model_dump(by_alias=True, exclude_none=True, mode="json")
            if self.is_error:
                doc.pop("_meta", None)
                extra = _with_error_meta(extra, json.dumps(self.structured, separators=(",", ":")))
            return (json.dumps(doc, separators=(",", ":"))[:-1] + extra + "}").encode()


def _with_error_meta(extra: str, error_json: str) -> str:
    """`extra` with the error in its `_meta` object (added when it has none)."""
    meta = f'"{ERROR_META}":{error_json}'
    if '"_meta":{' in extra:
        return extra.replace('"_meta":{', f'"_meta":{{{meta},', 1)
    return f',"_meta":{{{meta}}}{extra}'


def result_code(result: Outcome) -> str:
    return str(result.structured.get("code", "INTERNAL_ERROR")) if result.is_error else "OK"


def result_refs(arguments: dict[str, Any] | None, result: Outcome) -> dict[str, Any]:
    """Entry, transaction and receipt ids of a call, for its audit record (never values)."""
    refs: dict[str, Any] = {}
    args = arguments or {}
    for key in ("entry", "name", "tx_id", "space"):
        value = args.get(key)
        if isinstance(value, str):
            refs["tx" if key == "tx_id" else key] = value[:200]
    body = result.structured
    for key in ("tx_id", "receipt", "id"):
        value = body.get(key)
        if isinstance(value, str):
            refs[{"tx_id": "tx", "id": "entry_id"}.get(key, key)] = value[:200]
    entry = body.get("entry")
    if isinstance(entry, dict) and isinstance(entry.get("id"), str):
        refs["entry_id"] = entry["id"]
    return refs


# Hints for the model name tools, not CLI commands; what only the person can do is said so.
MODEL_HINTS = {
    "ENTRY_NOT_FOUND": "call search_entries with part of the name (or list_entries) and use "
    "the exact name or id it returns",
    "AMBIGUOUS_ENTRY": "pass space, or the entry id that search_entries returns",
    "SPACE_NOT_FOUND": "call assist (or list_entries) to see the spaces this session can use",
    "REQUEST_NOT_FOUND": "call list_my_requests to see your requests",
    "VAULT_LOCKED": 'ask the person to run "apm unlock" in a terminal (no tool can unlock '
    "it), then call the tool again",
}
_CLI_HINTS = (  # a CLI step with a tool that does the same
    (re.compile(r'run "apm show [^"]*" to list its fields'), "call get_entry to see its fields"),
    (re.compile(r'create it with "apm space add [^"]*"'), "create it with manage_spaces"),
    (re.compile(r'^(?:run|list them with) ("apm [^"]*")'), r"ask the person to run \1"),
)
# pydantic error types whose message states the rule without echoing the input
_SAFE_MESSAGES = frozenset(
    {
        "string_too_short", "string_too_long", "too_short", "too_long", "greater_than",
        "greater_than_equal", "less_than", "less_than_equal", "multiple_of", "missing",
        "extra_forbidden", "literal_error", "enum", "string_type", "int_type", "int_parsing",
        "bool_type", "bool_parsing", "dict_type", "list_type", "float_type", "float_parsing",
        "string_pattern_mismatch", "int_from_float",
    }
)  # fmt: skip


def model_hint(code: str, hint: str | None) -> str | None:
    """The hint as the model should read it: a tool to call, or what to ask the person."""
    if code in MODEL_HINTS and (not hint or '"apm ' in hint):
        return MODEL_HINTS[code]
    for pattern, replacement in _CLI_HINTS:
        if hint and pattern.search(hint):
            return pattern.sub(replacement, hint)
    if hint and '"apm ' in hint and not hint.startswith(("ask ", "the person")):
        return f"only the person can do this; ask them to: {hint}"
    return hint


def _validation_message(exc: ValidationError) -> str:
    """Each field and the rule it broke (the limit included), never the value given."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(arguments)"
        rule = e["msg"] if e["type"] in _SAFE_MESSAGES else e["type"].replace("_", " ")
        parts.append(f"{where}: {rule}")
    return "invalid parameters: " + "; ".join(parts)


def error_outcome(exc: BaseException, naming: str = "apm", spec: ToolSpec | None = None) -> Outcome:
    body = to_wire_error(exc)
    if isinstance(exc, ValidationError):
        body.message = _validation_message(exc)
        body.hint = "call the tool again with these fields fixed (its inputSchema has the rules)"
    fields = body.data.get("fields")
    if spec is not None and spec.renamed and isinstance(fields, list):  # the tool's arguments
        body.data = {**body.data, "fields": [spec.argument_path(str(f)) for f in fields]}
    body.hint = model_hint(body.code, body.hint)
    if body.hint:
        body.hint = rename_text(body.hint, naming)
    text = f"Error {body.code}: {body.message}."
    if body.hint:
        text += f" Fix: {body.hint}"
    # data never holds secrets (field names, ids; a conflict's fresh, masked preview)
    structured = {
        "code": body.code,
        "message": body.message,
        "hint": body.hint or "",
        **({"data": body.data} if body.data else {}),
    }
    return Outcome(structured, text, is_error=True)


async def call(ctx: Context, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
    """Validate, run through the gate; every failure becomes an error result."""
    return (await run(ctx, name, arguments)).to_mcp()


# validated arguments of frozen argument models (get_entry's), by their exact items: a hit
# skips the validation, which is a pure function of them. Only scalars are keys; `type(v)` in
# the key keeps True and 1 (equal and hashing alike) apart. Cleared when full.
_ARGS: dict[tuple[Any, ...], BaseModel] = {}
_ARGS_MAX = 1024
_ARG_SCALARS = frozenset({str, bool, int, type(None)})


def _args(model: type[BaseModel], arguments: dict[str, Any] | None) -> BaseModel:
    """`model.model_validate(arguments or {})`, remembered for a frozen model."""
    if not arguments or not model.model_config.get("frozen"):
        return model.model_validate(arguments or {})
    key: tuple[Any, ...] = (model,)
    for k, v in arguments.items():
        t = type(v)
        if t not in _ARG_SCALARS:
            return model.model_validate(arguments)
        key += (k, t, v)
    hit = _ARGS.get(key)
    if hit is None:
        hit = model.model_validate(arguments)  # (a ValidationError is never remembered)
        if len(_ARGS) >= _ARGS_MAX:
            _ARGS.clear()
        _ARGS[key] = hit
    return hit


async def run(ctx: Context, name: str, arguments: dict[str, Any] | None) -> Outcome:
    """`call` without the SDK model: what the relay's fast path serializes itself."""
    ctx.via = "mcp"  # the tool call gets one audit record, written by its caller
    naming = ctx.naming  # the session's, else the broker's (State.tool_naming)
    spec: ToolSpec | None = None
    try:
        spec = spec_for(name, naming)
        if spec is None:
            from broker.wire.errors import InvalidParameters

            raise InvalidParameters(
                f"unknown tool {name[:64]!r}", hint="call tools/list for the available tools"
            )
        args = _args(spec.args, arguments)
        # who may run it is the gate's decision alone (invoke: session, scope, filter, grants,
        # approval): a tool either is one operation or its runner calls invoke before it reads
        op = find(spec.op) if spec.op is not None else None
        out: BaseModel | Shaped
        if op is not None:
            out = await invoke(ctx, op, args)
        elif spec.run is not None:
            out = await spec.run(ctx, args)
        else:
            raise InternalError(f"tool {spec.name} runs nothing")
        if isinstance(out, Shaped):  # already in its JSON shape (get_entry)
            structured, text = out.doc, out.json
        else:
            structured, text = out.model_dump(mode="json"), None
        if TOOL_NAMINGS.get(naming):
            structured, text = _rename_doc(structured, naming), None
        if text is None:
            # compact: json.dumps with indent= falls back to the pure-Python encoder (~10x
            # slower); the same text is the structured content on the wire
            text = _COMPACT(structured)
        return Outcome(structured, text, is_error=False, structured_json=text)
    except (ApmError, ValidationError) as exc:
        return error_outcome(exc, naming, spec)
    except Exception as exc:
        log.error("tool %s failed", name[:64], exc_info=exc)
        return error_outcome(InternalError(), naming)
