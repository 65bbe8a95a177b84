"""A small etcd v3 client over etcd's JSON gateway (httpx2): put, range, txn, delete, watch,
with TLS client certificates and failover across endpoints.

Why the gateway and not a gRPC client: the `etcd3` package needs protobuf<4 (dead end, see
FACTS.md) and the gateway is part of every etcd ≥3.4; httpx2 is already installed as the MCP
SDK's HTTP client, so this adds no dependency.

Rules:
- `trust_env=False`: the environment (proxies, REQUESTS_CA_BUNDLE/SSL_CERT_FILE) never changes
  where we connect or which CA we trust; only the configured cacert does.
- Every call has a deadline; an endpoint that fails is skipped for the next one, with backoff.
- A cluster that cannot answer (no quorum, all down) is `SyncUnavailable`; nothing else leaks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2

from broker.wire.errors import SyncUnavailable

# how long one request may take; a gateway write without quorum answers 503 only after ~7 s
REQUEST_TIMEOUT = 3.0
# the whole call (all endpoints, with backoff)
CALL_DEADLINE = 6.0
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
REFUSED_ROUNDS = 3
# a watch stream quiet this long is reopened (and a stopped watcher ends)
WATCH_IDLE = 1.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(kv.get("key")).decode("utf-8", "replace"),
            value=unb64(kv.get("value")),
            mod_revision=int(kv.get("mod_revision", 0)),
            create_revision=int(kv.get("create_revision", 0)),
            version=int(kv.get("version", 0)),
        )


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    revision: int  # the cluster's revision when the batch was sent
    events: list[WatchEvent]


class Compacted(Exception):
    """The watch's start revision was compacted away; resync from a full range."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"compacted at {compact_revision}")
        self.compact_revision = compact_revision


class _EndpointFailed(Exception):
    pass


@dataclass(frozen=True)
class TlsFiles:
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None


class EtcdClient:
    """One client per broker: thread-safe (httpx2.Client is), one preferred endpoint."""

    def __init__(self, endpoints: list[str], tls: TlsFiles | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self._tls = tls or TlsFiles()
        self._preferred = 0
        self._lock = threading.Lock()
        self.last_revision = 0
        self._streams: set[Any] = set()
        self._client = httpx2.Client(
            verify=self._ssl_context(), trust_env=False, timeout=REQUEST_TIMEOUT
        )

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self._tls.cacert)
        if self._tls.cert:
            ctx.load_cert_chain(self._tls.cert, self._tls.key)
        return ctx

    def cancel_watches(self) -> None:
        """End every open watch stream (its iterator returns or raises)."""
        with self._lock:
            streams = list(self._streams)
        for resp in streams:
            with contextlib.suppress(Exception):  # a dead stream may fail to close in any way
                resp.close()

    def close(self) -> None:
        self.cancel_watches()
        self._client.close()

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        with self._lock:
            first = self._preferred
        return [(first + i) % n for i in range(n)]

    def _post_one(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._client.post(endpoint + path, json=body)
        except httpx2.HTTPError as exc:
            raise _EndpointFailed(type(exc).__name__) from exc
        if resp.status_code >= 500:
            raise _EndpointFailed(f"HTTP {resp.status_code}")
        doc: dict[str, Any] = resp.json()
        if resp.status_code != 200:
            raise _EndpointFailed(f"HTTP {resp.status_code}: {doc.get('message', '')[:80]}")
        return doc

    def _call(self, path: str, body: dict[str, Any], deadline: float = CALL_DEADLINE) -> Any:
        end = time.monotonic() + deadline
        delay = BACKOFF_START
        last = "no endpoint tried"
        refused_rounds = 0
        while True:
            refused = 0
            for i in self._order():
                try:
                    doc = self._post_one(self.endpoints[i], path, body)
                except _EndpointFailed as exc:
                    last = f"{self.endpoints[i]}: {exc}"
                    refused += str(exc) == "ConnectError"
                    if time.monotonic() >= end:
                        break
                    continue
                with self._lock:
                    self._preferred = i
                rev = int(doc.get("header", {}).get("revision", 0))
                self.last_revision = max(self.last_revision, rev)
                return doc
            # nothing listening anywhere (not a slow election): give up after a few rounds
            refused_rounds = refused_rounds + 1 if refused == len(self.endpoints) else 0
            if time.monotonic() + delay >= end or refused_rounds >= REFUSED_ROUNDS:
                raise SyncUnavailable(data={"last_error": last})
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    # -- kv -------------------------------------------------------------------------------

    def put(self, key: str, value: bytes) -> int:
        doc = self._call("/v3/kv/put", {"key": b64(key.encode()), "value": b64(value)})
        return int(doc["header"]["revision"])

    def delete(self, key: str, prefix: bool = False) -> int:
        body: dict[str, Any] = {"key": b64(key.encode())}
        if prefix:
            body["range_end"] = b64(prefix_end(key.encode()))
        return int(self._call("/v3/kv/deleterange", body)["header"]["revision"])

    def range(
        self,
        key: str,
        *,
        prefix: bool = False,
        revision: int = 0,
        serializable: bool = False,
    ) -> tuple[list[KeyValue], int]:
        """The keys and the revision they were read at."""
        body: dict[str, Any] = {"key": b64(key.encode())}
        if prefix:
            body["range_end"] = b64(prefix_end(key.encode()))
        if revision:
            body["revision"] = str(revision)
        if serializable:
            body["serializable"] = True
        doc = self._call("/v3/kv/range", body)
        kvs = [KeyValue.from_json(kv) for kv in doc.get("kvs", [])]
        return kvs, int(doc["header"]["revision"])

    def count_newer(self, prefix: str, revision: int) -> int:
        """How many keys under `prefix` changed after `revision` (a replica's lag)."""
        # etcd's `count` is taken before the min_mod_revision filter: count the keys returned
        body = {
            "key": b64(prefix.encode()),
            "range_end": b64(prefix_end(prefix.encode())),
            "keys_only": True,
            "min_mod_revision": str(revision + 1),
        }
        return len(self._call("/v3/kv/range", body, deadline=2.0).get("kvs", []))

    def get(self, key: str) -> KeyValue | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, list[dict[str, Any]], int]:
        """(succeeded, responses, revision). Build ops with the helpers below."""
        body = {"compare": compare, "success": success, "failure": failure or []}
        doc = self._call("/v3/kv/txn", body)
        return (
            bool(doc.get("succeeded", False)),
            doc.get("responses", []),
            int(doc["header"]["revision"]),
        )

    def compact(self, revision: int) -> None:
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def health(self) -> list[dict[str, Any]]:
        """Each endpoint's state, asked directly (no failover): ok, revision, leader, error."""
        out: list[dict[str, Any]] = []
        for ep in self.endpoints:
            try:
                resp = self._client.post(ep + "/v3/maintenance/status", json={}, timeout=1.0)
                doc = resp.json()
                out.append(
                    {
                        "endpoint": ep,
                        "ok": resp.status_code == 200,
                        "revision": int(doc.get("header", {}).get("revision", 0)),
                        "leader": doc.get("leader") is not None and doc.get("leader") != "0",
                    }
                )
            except (httpx2.HTTPError, ValueError) as exc:
                out.append({"endpoint": ep, "ok": False, "error": type(exc).__name__})
        return out

    # -- watch ----------------------------------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event, idle: float = WATCH_IDLE
    ) -> Iterator[WatchBatch]:
        """Batches of events under `prefix` from `start_revision` on, from the first endpoint
        that answers. Raises Compacted, or SyncUnavailable when no endpoint accepts the watch;
        returns when the stream ends, `stop` is set, or nothing came for `idle` seconds (the
        caller reconnects from its last applied revision: a read blocked in another thread
        cannot be interrupted, so the idle timeout is how a stopped watcher notices)."""
        body = {
            "create_request": {
                "key": b64(prefix.encode()),
                "range_end": b64(prefix_end(prefix.encode())),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        last = "no endpoint tried"
        for i in self._order():
            ep = self.endpoints[i]
            try:
                with self._client.stream(
                    "POST",
                    ep + "/v3/watch",
                    json=body,
                    timeout=httpx2.Timeout(REQUEST_TIMEOUT, read=idle),
                ) as resp:
                    with self._lock:
                        self._streams.add(resp)
                    if resp.status_code != 200:
                        last = f"{ep}: HTTP {resp.status_code}"
                        continue
                    with self._lock:
                        self._preferred = i
                    for line in resp.iter_lines():
                        if stop.is_set():
                            return
                        if not line.strip():
                            continue
                        yield from self._watch_line(line)
                    return
            except httpx2.ReadTimeout:
                return
            except (httpx2.HTTPError, httpx2.StreamError) as exc:
                if stop.is_set():
                    return
                last = f"{ep}: {type(exc).__name__}"
                continue
            finally:
                with self._lock:
                    self._streams = {s for s in self._streams if not s.is_closed}
        raise SyncUnavailable(data={"last_error": last})

    def _watch_line(self, line: str) -> Iterator[WatchBatch]:
        try:
            doc = json.loads(line)
        except ValueError:
            return
        result = doc.get("result", doc)
        if "error" in doc:
            raise httpx2.ReadError(str(doc["error"].get("message", "watch error"))[:80])
        if result.get("canceled"):
            compact = int(result.get("compact_revision", 0))
            if compact:
                raise Compacted(compact)
            raise httpx2.ReadError("watch canceled")
        rev = int(result.get("header", {}).get("revision", 0))
        self.last_revision = max(self.last_revision, rev)
        events = [
            WatchEvent(ev.get("type", "PUT").lower(), KeyValue.from_json(ev.get("kv", {})))
            for ev in result.get("events", [])
        ]
        yield WatchBatch(rev, events)


# -- txn op builders (the gateway's JSON shapes) ---------------------------------------------


def cmp_mod_revision(key: str, mod_revision: int) -> dict[str, Any]:
    return {
        "key": b64(key.encode()),
        "target": "MOD",
        "result": "EQUAL",
        "mod_revision": str(mod_revision),
    }


def op_put(key: str, value: bytes) -> dict[str, Any]:
    return {"request_put": {"key": b64(key.encode()), "value": b64(value)}}


def op_range(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key.encode())}}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key.encode())}}
