"""Proof under load and faults: 64 shims at once, kill -9 mid-commit, a full disk, a shim
killed mid-call.

CI runs quick sizes. `APM_FULL=1 .venv/bin/pytest tests/test_load_faults.py` runs the full ones
(64 shims x 500 calls; 200 kill -9 iterations).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import PASSWORD, Apm, Broker, clean_env, end_child
from .mcp_client import error_body

pytestmark = pytest.mark.slow

FULL = os.environ.get("APM_FULL") == "1"
SHIM = str(Path(sys.executable).parent / "apm-mcp")
RSS_BOUND_MIB = 96  # the broker may grow at most this much from warm-up to the end of the load


class RawShim:
    """An apm-mcp process driven over its stdio pipes, one JSON-RPC line at a time."""

    def __init__(self, home: Path, token: str) -> None:
        self.proc = subprocess.Popen(
            [SHIM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=clean_env(home, APM_EPHEMERAL_ID=token),
        )
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.next_id = 0

    def send(self, doc: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(doc).encode() + b"\n")
        self.proc.stdin.flush()

    def _line(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                raise TimeoutError("no answer from the shim")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError("the shim closed its stdout")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(line)
        return doc

    def request(self, method: str, params: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while True:
            doc = self._line(deadline)
            if doc.get("id") == rid:
                return doc

    def initialize(self) -> None:
        doc = self.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "load-test", "version": "1"},
            },
        )
        assert "result" in doc, doc
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def tool(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        doc = self.request("tools/call", {"name": name, "arguments": args})
        if "error" in doc:
            raise AssertionError(f"protocol error from {name}: {doc['error']}")
        result: dict[str, Any] = doc["result"]
        return result

    def close(self) -> None:
        end_child(self.proc)
        self.sel.close()


def _token(apm: Apm, scope: str) -> str:
    out = apm.ok("delegate", "--scope", scope, "--ttl", "2h", "--json").stdout
    token: str = json.loads(out)["token"]
    return token


def _names(apm: Apm) -> set[str]:
    return {e["name"] for e in json.loads(apm.ok("ls", "--json").stdout)}


def test_sixty_four_shims_under_mixed_load_lose_no_commit_and_get_no_protocol_error(
    vault: Broker, apm: Apm, home: Path, record_property: Any
) -> None:
    apm.ok("add", "totp", "otp", "--from-stdin", stdin="otpauth://totp/x?secret=JBSWY3DPEHPK3PXP\n")
    apm.ok("add", "login", "site", "--field", "username=u", "--from-stdin", stdin="pw-site-1\n")
    token = _token(apm, "write")
    shims = [RawShim(home, token) for _ in range(64)]
    calls = 500 if FULL else 16
    latencies: list[float] = []
    receipts: list[tuple[str, str]] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        for s in shims:
            s.initialize()
        for s in shims:  # warm-up: every connection attached and served once
            s.tool("search_entries", {"query": "site"})
        rss_warm = psutil.Process(vault.pid).memory_info().rss

        def drive(idx: int, shim: RawShim) -> None:
            try:
                for n in range(calls):
                    t0 = time.perf_counter()
                    kind = n % 4
                    if kind == 0:
                        r = shim.tool("search_entries", {"query": "site"})
                    elif kind == 1:
                        r = shim.tool("get_totp", {"entry": "otp"})
                    elif kind == 2:
                        r = shim.tool("get_entry", {"entry": "site"})
                    else:
                        name = f"load-{idx}-{n}"
                        args = {"type": "login", "name": name, "secrets": {"password": "x" * 12}}
                        r = shim.tool("add_entry", args)
                        tx = r["structuredContent"]["tx_id"]
                        r = shim.tool("add_entry", {"tx_id": tx, "approve": True})
                        with lock:
                            receipts.append((name, r["structuredContent"]["receipt"]))
                    if r.get("isError"):
                        raise AssertionError(f"tool error: {r.get('structuredContent')}")
                    with lock:
                        latencies.append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # collected and asserted on below
                with lock:
                    errors.append(f"shim {idx}: {exc!r}"[:300])

        threads = [threading.Thread(target=drive, args=(i, s)) for i, s in enumerate(shims)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=1800)
        rss_end = psutil.Process(vault.pid).memory_info().rss
    finally:
        for s in shims:
            s.close()
    assert errors == []
    assert len(receipts) == 64 * (calls // 4)
    assert all(r.startswith("rcpt_") for _, r in receipts)
    assert {n for n, _ in receipts} <= _names(apm)  # every receipted commit is in the vault
    p50 = statistics.median(latencies)
    p99 = sorted(latencies)[int(0.99 * len(latencies))]
    growth = (rss_end - rss_warm) / (1 << 20)
    record_property("calls", len(latencies))
    record_property("p50_ms", round(p50, 2))
    record_property("p99_ms", round(p99, 2))
    record_property("rss_growth_mib", round(growth, 1))
    print(f"64 shims x {calls} calls: p50 {p50:.1f} ms, p99 {p99:.1f} ms, RSS +{growth:.1f} MiB")
    assert growth <= RSS_BOUND_MIB


def _audit_findings(apm: Apm) -> list[str]:
    out = apm("audit", "verify", "--json")
    findings: list[str] = json.loads(out.stdout)["findings"]
    return findings


def test_kill_9_at_random_points_of_a_commit_loop_keeps_every_receipted_change(
    vault: Broker, apm: Apm, home: Path
) -> None:
    rng = random.Random(8)  # reproducible fault timing
    iterations = 200 if FULL else 6
    receipted: list[str] = []
    token = _token(apm, "write")
    for it in range(iterations):
        shim = RawShim(home, token)
        stop = threading.Event()

        def loop(shim: RawShim = shim, it: int = it, stop: threading.Event = stop) -> None:
            n = 0
            with contextlib.suppress(Exception):
                shim.initialize()
                while not stop.is_set():
                    name = f"crash-{it}-{n}"
                    r = shim.tool(
                        "add_entry",
                        {"type": "note", "name": name, "secrets": {"content": "c" * 10}},
                    )
                    tx = r["structuredContent"]["tx_id"]
                    r = shim.tool(
                        "add_entry",
                        {"tx_id": tx, "approve": True},
                    )
                    if r["structuredContent"].get("receipt"):
                        receipted.append(name)
                    n += 1

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(rng.uniform(0.3, 1.2))
        vault.kill9()
        stop.set()
        t.join(timeout=60)
        shim.proc.kill()
        shim.close()
        vault.start()
        apm.ok("unlock")
        names = _names(apm)
        missing = [n for n in receipted if n not in names]
        assert missing == [], f"iteration {it}: receipted but lost: {missing[:5]}"
        problems = [f for f in _audit_findings(apm) if "torn" not in f]
        assert problems == [], f"iteration {it}: audit chain: {problems}"
    assert receipted, "the loop never committed anything: the test proved nothing"


@pytest.fixture
def small_disk() -> Any:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="apmfull-", dir="/tmp"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if r.returncode != 0:
        shutil.rmtree(mnt, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def test_a_full_disk_fails_the_write_cleanly_and_leaves_the_vault_intact(small_disk: Path) -> None:
    home = small_disk / "h"
    home.mkdir(mode=0o700)
    apm = Apm(home)
    broker = Broker(home).start()
    try:
        apm.ok("init", "--profile", "interactive")
        apm.ok("add", "login", "before", "--from-stdin", stdin="kept-secret-1\n")
        filler = small_disk / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        refused = apm(
            "add", "login", "during", "--from-stdin", password=PASSWORD, stdin="lost-secret-2\n"
        )
        assert refused.returncode == 11, refused.stderr  # STORAGE_ERROR's exit code
        filler.unlink()
        apm.ok("lock", password=None)
        apm.ok("unlock")
        assert _names(apm) == {"before"}
        assert apm.ok("get", "before").stdout == "kept-secret-1\n"
    finally:
        broker.stop()


def test_a_shim_killed_mid_call_has_its_connection_state_freed(
    vault: Broker, apm: Apm, home: Path
) -> None:
    token = _token(apm, "read")
    shim = RawShim(home, token)
    shim.initialize()
    shim.tool("search_entries", {"query": "x"})

    def connections() -> int:
        n: int = json.loads(apm.ok("status", "--json", password=None).stdout)["mcp_connections"]
        return n

    assert connections() == 1
    shim.send(
        {
            "jsonrpc": "2.0",
            "id": 99,
            "method": "tools/call",
            "params": {"name": "search_entries", "arguments": {"query": "y"}},
        }
    )
    shim.proc.send_signal(signal.SIGKILL)
    shim.close()
    deadline = time.monotonic() + 20
    while connections() != 0:
        assert time.monotonic() < deadline, "the dead shim's connection was never freed"
        time.sleep(0.2)
    other = RawShim(home, token)  # and the broker still serves new shims
    try:
        other.initialize()
        assert not other.tool("search_entries", {"query": "x"}).get("isError")
    finally:
        other.close()


def test_a_call_while_a_killed_broker_left_its_socket_behind_is_answered_with_the_fix(
    vault: Broker, apm: Apm, home: Path
) -> None:
    token = _token(apm, "read")
    shim = RawShim(home, token)
    try:
        shim.initialize()
        assert not shim.tool("list_entries", {}).get("isError")
        vault.kill9()  # the socket file stays: nothing answers behind it
        assert vault.socket.exists()
        t0 = time.monotonic()
        doc = shim.request("tools/call", {"name": "list_entries", "arguments": {}}, timeout=20)
        waited = time.monotonic() - t0
        body = error_body(doc["result"])  # an error: no structuredContent, the code in _meta
        assert body["code"] == "BROKER_UNAVAILABLE"
        assert "apm broker start" in body["hint"]
        assert waited < 15, f"the call was held {waited:.1f} s"
    finally:
        shim.close()
