"""The loopback approval page: `/approve/<one-time id>` shows one pending transaction or access
request exactly (escaped; secrets as length + fingerprint) and takes the person's decision, or
registers a passkey. Served on the HTTP listener when it is a loopback one, else on its own
loopback port (`page_server.PageServer`).

Rules:
- A decision runs the same operation as the terminal's (`tx.approve|deny`,
  `request.approve|deny`) through `dispatch.invoke`, with the person's proof: a user-verifying
  passkey assertion for this page's challenge, or — while no passkey is registered — the
  master password typed on the page.
- Every request must name this listener in Host (DNS rebinding); every POST needs an Origin
  naming this listener and the page's CSRF token; every response
  carries a strict CSP (script only from this origin's static route, nothing inline), no
  framing, no referrer to other sites, no caching.
- Everything shown is escaped twice over: `display.escape` (control characters, bidi, escape
  sequences made visible) and then HTML escaping.
"""

from __future__ import annotations

import hmac
import html
import logging
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.core.vault import Vault
from broker.wire.display import args_lines, escape
from broker.wire.errors import ApmError, PermissionDenied
from broker.wire.protocol import Auth, RequestDecideParams, TxDecideParams

from .approval_links import Link
from .approval_view import shown_args
from .context import Context, totp_seed_field
from .dispatch import invoke, to_wire_error
from .operations import OPERATIONS
from .peer import Peer
from .state import State

log = logging.getLogger("apm.broker.page")

STATIC = Path(__file__).with_name("page_static")
MAX_BODY = 64 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make form POSTs send Origin: null
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _h(text: object) -> str:
    return html.escape(escape(text), quote=True)


def _page(title: str, body: str, status: int = 200) -> Response:
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_h(title)}</title>"
        '<link rel=stylesheet href="/approve-static/page.css">'
        '<script src="/approve-static/page.js" defer></script>'
        f"</head><body><main><h1>{_h(title)}</h1>{body}</main></body></html>"
    )
    return Response(doc, status_code=status, media_type="text/html", headers=HEADERS)


def _status(kind: str, text: str, status: int) -> Response:
    return _page("apm approval", f'<p id=status class="{kind}">{_h(text)}</p>', status)


def _rows(pairs: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in pairs)
    return f"<table>{cells}</table>"


def _pre(lines: list[str]) -> str:
    # args_lines has escaped every key and value; html.escape makes them inert markup
    return "<pre id=args>" + "\n".join(html.escape(line, quote=True) for line in lines) + "</pre>"


class Page:
    """The routes, bound to one broker state and the origins this listener answers as."""

    def __init__(self, state: State, origins: list[str]) -> None:
        self.state = state
        self.origins = origins
        self.hosts = {o.split("://", 1)[1] for o in origins}

    def _rebound(self, request: Request) -> Response | None:
        """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own Host."""
        if request.headers.get("host") in self.hosts:
            return None
        return _status("refused", "refused: this page answers only as localhost", 421)

    @staticmethod
    def _passkeys() -> Any:
        """The WebAuthn side, loaded at the first page view (webauthn costs ~0.1 s to import,
        kept off the broker's start)."""
        from . import passkeys

        return passkeys

    def routes(self) -> list[Route]:
        return [
            Route("/approve-static/{name}", self.static, methods=["GET"]),
            Route("/approve/{link_id}", self.show, methods=["GET"]),
            Route("/approve/{link_id}", self.decide, methods=["POST"]),
            Route("/approve/{link_id}/options", self.options, methods=["POST"]),
        ]

    # ------------------------------------------------------------------ helpers

    def _origin(self, request: Request) -> str | None:
        origin = request.headers.get("origin")
        return origin if origin in self.origins else None

    def _open(self, link_id: str) -> tuple[Link | None, str | None]:
        """The link and why it cannot be used (None: usable)."""
        link = self.state.links.get(link_id)
        if link is None:
            return None, "this approval link is unknown, used or expired"
        if self.state.cache.peek() is None:
            return link, "the vault is locked; run apm unlock, then reload this page"
        now = self.state.clock()
        if link.kind == "passkey":
            if link.expires_at is not None and now >= link.expires_at:
                return link, "this registration link has expired; run apm passkey add again"
            return link, None
        try:
            if link.kind == "tx":
                tx = self.state.txs.get(link.item, None)
                status = tx.status(now)
                if status not in ("pending", "awaiting_owner") or tx.policy == "agent":
                    return link, f"this change is {status}; nothing is left to decide"
            else:
                req = self.state.requests().get(link.item, None)
                status = req.status(now)
                if status != "pending":
                    return link, f"this request is {status}; nothing is left to decide"
        except ApmError:
            return None, "this approval link is unknown, used or expired"
        return link, None

    def _ctx(self, auth: Auth | None) -> Context:
        return Context(
            state=self.state,
            peer=Peer(uid=os.getuid(), gid=os.getgid(), pid=None),
            auth=auth,
            request_id="approval-page",
        )

    # ------------------------------------------------------------------ routes

    async def static(self, request: Request) -> Response:
        if (rebound := self._rebound(request)) is not None:
            return rebound
        name = request.path_params["name"]
        types = {"page.js": "text/javascript", "page.css": "text/css"}
        if name not in types:
            return Response("not found", status_code=404, headers=HEADERS)
        body = (STATIC / name).read_bytes()
        return Response(body, media_type=types[name], headers=HEADERS)

    async def show(self, request: Request) -> Response:
        if (rebound := self._rebound(request)) is not None:
            return rebound
        link, closed = self._open(request.path_params["link_id"])
        if link is None:
            return _status("closed", closed or "", 404)
        if closed is not None:
            return _status("closed", closed, 410)
        if link.kind == "passkey":
            return self._register_page(link)
        vault = self.state.cache.peek()
        has_passkey = self._passkeys().registered(vault)
        if link.kind == "tx":
            details, title = self._tx_details(link.item), "Approve a change?"
        else:
            details, title = self._request_details(link.item), "Grant access?"
        proof = (
            "<p>Approving needs your passkey.</p>"
            "<button type=button id=passkey-approve>Approve with passkey</button>"
            if has_passkey
            else "<label>Master password <input type=password name=password id=password "
            "autocomplete=current-password></label>"
            "<button type=submit name=decision value=approve id=approve>Approve</button>"
        )
        # denying a write is an owner decision too: with a passkey, the Deny button runs it
        deny_type = "button data-passkey=1" if has_passkey and link.kind == "tx" else "submit"
        use_only = ""
        if link.kind == "request":
            req = self.state.requests().get(link.item, None)
            if req.access == "reveal":
                use_only = (
                    "<label><input type=checkbox name=use_only value=1 id=use_only> "
                    "grant use only (apm run), not the value itself</label>"
                )
        form = (
            f'<form id=decide method=post action="/approve/{_h(link.id)}" '
            f'data-link="{_h(link.id)}">'
            f'<input type=hidden name=csrf id=csrf value="{_h(link.csrf)}">'
            "<input type=hidden name=assertion id=assertion value=''>"
            f"{use_only}{proof}"
            f"<button type={deny_type} name=decision value=deny id=deny>Deny</button></form>"
            "<p id=status></p>"
        )
        return _page(title, details + form)

    def _session_rows(self, accessor: str) -> list[tuple[str, object]]:
        rec = self.state.sessions().records.get(accessor)
        if rec is None:
            return [("session", f"{accessor} (ended)")]
        bindings = args_lines(rec.bindings.model_dump(mode="json", exclude_defaults=True), "")
        return [
            ("session", f"{rec.label or '-'} ({rec.accessor})"),
            ("scope", rec.scope),
            ("client", rec.declared_agent or "not declared"),
            ("bindings", "; ".join(bindings) or "none"),
            ("session expires", rec.expires_at.isoformat(timespec="seconds")),
        ]

    def _tx_details(self, tx_id: str) -> str:
        tx = self.state.txs.get(tx_id, None)
        rows: list[tuple[str, object]] = [
            ("transaction", tx.tx_id),
            ("tool", tx.tool),
            ("runs", tx.method),
            ("policy", tx.policy),
            ("link expires", tx.expires_at.isoformat(timespec="seconds")),
        ]
        rows += self._session_rows(tx.accessor)
        args = args_lines(shown_args(tx.params), "")
        return _rows(rows) + "<h2>Exactly these arguments</h2>" + _pre(args)

    def _request_details(self, req_id: str) -> str:
        req = self.state.requests().get(req_id, None)
        kind = (
            "REVEAL: the value itself reaches the model"
            if req.access == "reveal"
            else "use only: apm run puts it into a command; the model never sees it"
        )
        entry = self.state.cache.get().entries.get(req.entry_id)
        seed = entry is not None and req.field is not None and req.field == totp_seed_field(entry)
        rows: list[tuple[str, object]] = [
            ("request", req.id),
            ("entry", f"{req.space}/{req.entry_name}"),
            ("field", req.field or "the whole entry"),
            *([("TOTP SEED", "the seed itself: codes forever, not only codes")] if seed else []),
            ("access", kind),
            ("duration", f"{req.minutes} minutes"),
            ("justification", req.justification),
        ]
        rows += self._session_rows(req.accessor)
        return _rows(rows)

    def _register_page(self, link: Link) -> Response:
        body = (
            "<p>Register a passkey for approving apm changes and requests. Your authenticator "
            "will ask for your PIN or biometrics.</p>"
            f'<form id=register method=post action="/approve/{_h(link.id)}" '
            f'data-link="{_h(link.id)}">'
            f'<input type=hidden name=csrf id=csrf value="{_h(link.csrf)}">'
            "<input type=hidden name=credential id=credential value=''>"
            "<label>Name <input name=label id=label value='passkey'></label>"
            "<button type=button id=passkey-register>Register passkey</button></form>"
            "<p id=status></p>"
        )
        return _page("Register a passkey", body)

    async def _form(self, request: Request) -> dict[str, str] | None:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                return None
        try:
            parsed = urllib.parse.parse_qs(raw.decode(), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return None
        return {k: v[0] for k, v in parsed.items()}

    def _forged(self, request: Request, link: Link, csrf: str | None) -> Response | None:
        """Origin and CSRF token: a page elsewhere can do neither."""
        if self._origin(request) is None:
            log.warning("approval page: POST refused (Origin %r)", request.headers.get("origin"))
            return _status("refused", "refused: this request did not come from this page", 403)
        if not csrf or not hmac.compare_digest(csrf.encode(), link.csrf.encode()):
            log.warning("approval page: POST refused (CSRF token)")
            return _status("refused", "refused: the page token is missing or wrong", 403)
        return None

    async def options(self, request: Request) -> Response:
        if (rebound := self._rebound(request)) is not None:
            return rebound
        link, closed = self._open(request.path_params["link_id"])
        if link is None or closed is not None:
            return _status("closed", closed or "", 410 if link else 404)
        refused = self._forged(request, link, request.headers.get("x-apm-csrf"))
        if refused is not None:
            return refused
        vault = self.state.cache.peek()
        if vault is None:
            return _status("closed", "the vault is locked", 503)
        if link.kind == "passkey":
            doc, link.challenge = self._passkeys().registration_options(vault)
        else:
            if not self._passkeys().registered(vault):
                return _status("closed", "no passkey is registered", 409)
            doc, link.challenge = self._passkeys().authentication_options(vault)
        return Response(doc, media_type="application/json", headers=HEADERS)

    async def decide(self, request: Request) -> Response:
        if (rebound := self._rebound(request)) is not None:
            return rebound
        link, closed = self._open(request.path_params["link_id"])
        if link is None or closed is not None:
            return _status("closed", closed or "", 410 if link else 404)
        form = await self._form(request)
        if form is None:
            return _status("refused", "refused: the form is malformed or too large", 400)
        refused = self._forged(request, link, form.get("csrf"))
        if refused is not None:
            return refused
        origin = self._origin(request) or ""
        try:
            if link.kind == "passkey":
                return await self._register(link, form, origin)
            return await self._decide(link, form, origin)
        except ApmError as exc:
            body = to_wire_error(exc)
            return _status("error", f"{body.code}: {body.message}", 403)

    async def _register(self, link: Link, form: dict[str, str], origin: str) -> Response:
        challenge, link.challenge = link.challenge, None  # one use
        if challenge is None:
            raise PermissionDenied("no registration was started on this page")
        credential = self._passkeys().parse_credential(form.get("credential", ""))
        state = self.state
        record = self._passkeys().verify_registration(
            credential, challenge, origin, form.get("label", "passkey"), state.clock()
        )

        def work(vault: Vault) -> None:
            with vault.mutation():
                vault.extra["passkeys"] = [*self._passkeys().stored(vault), record]

        # the vault open once the write lock is free (VAULT_LOCKED if a lock came first)
        log.debug("passkey registration verified; saving it")
        await state.vault_write(work)
        state.links.drop("passkey", link.item)
        state.record("passkey.added", self._ctx(None), label=record["label"])
        return _status("done", "passkey registered", 200)

    def _presence(self, link: Link, assertion: str, origin: str) -> Callable[[], Awaitable[None]]:
        """The proof the gate checks in place of the password: this page's challenge, used
        once, answered by a registered passkey with user verification."""
        state = self.state

        async def verify() -> None:
            challenge, link.challenge = link.challenge, None
            if challenge is None:
                raise PermissionDenied("no passkey challenge was issued for this page")
            vault = state.cache.get()
            updated = self._passkeys().verify_assertion(
                vault, self._passkeys().parse_credential(assertion), challenge, origin
            )

            def work() -> None:  # the new sign count, so a cloned authenticator shows
                with vault.mutation():
                    vault.extra["passkeys"] = [
                        updated if c["id"] == updated["id"] else c
                        for c in self._passkeys().stored(vault)
                    ]

            async with state.write_lock:
                state.still_open(vault)  # VAULT_LOCKED if a lock came while it waited
                await state.io(work)

        return verify

    async def _decide(self, link: Link, form: dict[str, str], origin: str) -> Response:
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            return _status("refused", "refused: choose approve or deny", 400)
        approve = decision == "approve"
        vault = self.state.cache.get()
        password = form.pop("password", "")
        assertion = form.get("assertion", "")
        auth: Auth | None = None
        presence = None
        proof_needed = approve or link.kind == "tx"  # tx.deny is an owner operation too
        if proof_needed:
            if self._passkeys().registered(vault):
                if not assertion:
                    raise PermissionDenied(
                        "this decision needs your passkey", hint="use the page's buttons"
                    )
                presence = self._presence(link, assertion, origin)
            else:
                if not password:
                    raise PermissionDenied(
                        "approving needs the master password",
                        hint="type it on the page, or register a passkey with apm passkey add",
                    )
                auth = Auth(password=SecretStr(password))
        ctx = self._ctx(auth)
        ctx.presence = presence
        params: BaseModel
        if link.kind == "tx":
            name = "tx.approve" if approve else "tx.deny"
            params = TxDecideParams(tx_id=link.item, reason="decided on the approval page")
        else:
            name = "request.approve" if approve else "request.deny"
            params = RequestDecideParams(
                request_id=link.item,
                reason="decided on the approval page",
                use_only=form.get("use_only") == "1",
            )
        result: Any = await invoke(ctx, OPERATIONS[name], params)
        state = getattr(result, "status", None) or getattr(result, "state", "")
        return _status("done", f"{'approved' if approve else 'denied'} ({state})", 200)


def page_origins(port: int) -> list[str]:
    return [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
