"""Benchmark: two-phase writes (preview -> commit) through the MCP shim, at 1k and 100k entries.

Run with the venv's interpreter (the pyenv `python3` shim adds ~89 ms per process start):

    .venv/bin/python bench/writes.py              # full run: 1k and 100k entries, a few minutes
    .venv/bin/python bench/writes.py --quick      # 1k entries, fewer repetitions
    .venv/bin/python bench/writes.py --json out.json

Everything is measured and printed from one run; nothing is asserted about timings. Per vault
size, a vault of realistic entries (sealed secret fields) is built directly with broker.core and
saved once; a real, unmodified broker (`python -m broker.server.daemon`) is started on it and
unlocked, and `write` sessions (approval policy `agent`) are created over the wire.

Commits are driven through the MCP tools, via the real `apm-mcp` shim spawned as a child and
spoken to over raw pipes (newline-delimited JSON-RPC, 2025-11-25 era with `initialize`), so no
MCP client library cost is counted:

- preview   = `add_entry` without tx_id (validate, store the transaction, audit record);
- commit    = `add_entry` with {tx_id, approve: true}: audit record, then the durable commit
              (v2: the new entry's two sealed rows and the state row in one SQLite
              transaction, WAL fsynced);
- tx_status = a read-only tool call through the same shim: the relay + SDK floor.

Baselines, measured in the same run and interleaved with the commits so both see the same
machine noise:

- wire entry.add = the plain one-phase `entry.add` over the broker's wire protocol with a session
  token (no MCP, no transaction; the same durable save);
- raw save       = `Vault.save()` of the same-size vault in this process after one entry
              changed: a v2 commit (that entry's rows and the state row, one SQLite
              transaction); beside it, today's v1 save of the same vault (whole file).

Throughput: commits/s for one session committing back to back, and for 8 sessions (8 shims,
one thread each) committing at once. Commits serialise on the broker's write lock (one SQLite
writer); each writes only the rows it changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from bench import fixtures  # noqa: E402
from broker import paths  # noqa: E402
from broker.cli.client import BrokerClient  # noqa: E402
from broker.core.vault import Vault  # noqa: E402
from broker.wire.errors import ApmError  # noqa: E402
from broker.wire.protocol import (  # noqa: E402
    EntryAddParams,
    EntryListParams,
    SecretValue,
    SessionCreateParams,
)

PY = sys.executable
SHIM = str(Path(sys.executable).parent / "apm-mcp")
PASSWORD = "bench horse battery staple"
PROFILE = "interactive"
CONCURRENT = 8
PROTOCOL = "2025-11-25"
SERVICES = ("github", "aws", "gcp", "stripe", "slack", "notion", "datadog", "sentry", "okta")
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class Reps:
    sequential: int  # preview+commit pairs by one session, interleaved with the baselines
    per_session: int  # preview+commit pairs by each of the 8 concurrent sessions
    raw_save: int


@dataclass(frozen=True)
class Plan:
    mode: str
    reps: dict[int, Reps]


# 100k: 8 commits per session (64 in all; with 2, the aggregate rate was 16 commits over ~85 ms)
FULL = Plan("full", {1_000: Reps(60, 8, 20), 100_000: Reps(10, 8, 5)})
QUICK = Plan("quick", {1_000: Reps(25, 4, 10)})


# --------------------------------------------------------------------------- helpers


def stats(samples: list[float]) -> dict[str, float]:
    """Samples in seconds -> milliseconds. p99 is nearest-rank: with n < 100 it is the max."""
    xs = sorted(samples)
    n = len(xs)
    return {
        "n": n,
        "p50_ms": statistics.median(xs) * 1e3,
        "p99_ms": xs[max(0, math.ceil(0.99 * n) - 1)] * 1e3,
        "mean_ms": statistics.fmean(xs) * 1e3,
        "min_ms": xs[0] * 1e3,
    }


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


@dataclass
class Harness:
    """Owns every temp dir and child process of the run; `close` cleans them all up."""

    homes: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def home(self) -> Path:
        h = Path(tempfile.mkdtemp(prefix="apmw-", dir="/tmp"))  # short: sun_path is 108 bytes
        self.homes.append(h)
        return h

    def spawn(self, argv: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for f in self.logs:
            with contextlib.suppress(OSError):
                f.close()
        for h in self.homes:
            shutil.rmtree(h, ignore_errors=True)


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env["APM_HOME"] = str(home)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- the vault


def build_vault(path: Path, n: int) -> Vault:
    """`n` realistic entries with sealed secrets (bench/fixtures.py), committed once."""
    return fixtures.build_vault(path, n, password=PASSWORD, profile=PROFILE)[0]


def raw_saves(vault: Vault, copy: Path, n: int) -> dict[str, Any]:
    """In this process: the v2 commit of one changed entry (what the broker does per write),
    and beside it today's v1 save of the same vault (the whole file rewritten)."""
    v1 = fixtures.build_vault(copy, len(vault.entries), password=PASSWORD, format=1)[0]
    steps: dict[str, list[float]] = {}

    def t(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return value

    try:
        for i in range(n):
            for label, each in (("Vault.save() (all of it)", vault), ("v1: whole-file save", v1)):
                e = next(iter(each.entries.values()))
                each.entries[e.id] = e.model_copy(update={"tags": [*e.tags[:1], f"b{i}"]})
                t(label, each.save)
    finally:
        v1.close()
    return {
        "file_bytes": sum(
            p.stat().st_size
            for p in (vault.path, vault.path.with_name(vault.path.name + "-wal"))
            if p.exists()
        ),
        "steps": {k: stats(v) for k, v in steps.items()},
    }


# --------------------------------------------------------------------------- broker and shim


@contextlib.contextmanager
def running_broker(h: Harness, home: Path) -> Iterator[BrokerClient]:
    out = open(home / "broker.out", "ab")  # noqa: SIM115 - closed by the harness
    h.logs.append(out)
    proc = h.spawn(
        [PY, "-m", "broker.server.daemon", "--no-stderr-log"],
        env_for(home),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    addr = paths.resolve({"APM_HOME": str(home)}).broker_addr
    client = BrokerClient(addr, client_name="apm-bench-writes")
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"broker exited early; see {home}/broker.out")
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not become ready in 60 s")
            if Path(addr[len("ipc://") :]).exists():
                with contextlib.suppress(ApmError):
                    client.call("broker.ping", timeout=2)
                    break
            time.sleep(0.02)
        yield client
    finally:
        client.close()
        h.stop(proc)


class Shim:
    """The real `apm-mcp` shim over raw pipes, one request in flight."""

    def __init__(self, h: Harness, home: Path, token: str) -> None:
        self.err_path = home / f"shim-stderr-{len(h.procs)}.log"
        err = open(self.err_path, "ab")  # noqa: SIM115 - closed by the harness
        h.logs.append(err)
        self.proc = h.spawn(
            [SHIM],
            env_for(home, APM_EPHEMERAL_ID=token),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd = self.proc.stdin.fileno()
        self.out = self.proc.stdout
        self.next_id = 0
        init = {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "bench-writes", "version": "0"},
        }
        self.rpc("initialize", init)
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, msg: dict[str, Any]) -> None:
        view = memoryview(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        while view:
            view = view[os.write(self.wfd, view) :]

    def rpc(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        while True:
            line = self.out.readline()
            if not line:
                tail = self.err_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"shim pid {self.proc.pid} closed stdout; stderr: {tail}")
            doc = json.loads(line)
            if doc.get("id") == self.next_id:
                if "result" not in doc:
                    raise RuntimeError(f"{method} failed: {line[:300]!r}")
                return dict(doc["result"])

    def tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = self.rpc("tools/call", {"name": name, "arguments": arguments})
        body = result.get("structuredContent") or {}
        if result.get("isError"):
            raise RuntimeError(f"{name} failed: {json.dumps(body)[:300]}")
        return dict(body)


def add_args(tag: str, i: int) -> dict[str, Any]:
    return {
        "type": "login",
        "name": f"bench-{tag}-{i:05d}",
        "tags": ["bench"],
        "url": "https://bench.example.com",
        "fields": {"username": f"bench{i}@example.com"},
        "secrets": {"password": f"pw-{tag}-{i}-Xy7!q9Lm2"},
    }


def wire_add(tag: str, i: int) -> EntryAddParams:
    a = add_args(tag, i)
    return EntryAddParams(
        type=a["type"],
        name=a["name"],
        tags=a["tags"],
        url=a["url"],
        fields=a["fields"],
        secrets={"password": SecretValue(value=SecretStr(a["secrets"]["password"]))},
    )


# --------------------------------------------------------------------------- one size


def bench_size(h: Harness, n: int, r: Reps) -> dict[str, Any]:
    home = h.home()
    vpath = paths.resolve({"APM_HOME": str(home)}).vault
    log(f"{n:,} entries: building the vault")
    t0 = time.perf_counter()
    vault = build_vault(vpath, n)
    res: dict[str, Any] = {"entries": n, "build_s": time.perf_counter() - t0}
    try:
        log(f"{n:,} entries: raw Vault.save() x{r.raw_save}")
        res["raw_save"] = raw_saves(vault, home / "copy.apm", r.raw_save)
    finally:
        vault.close()
    (home / "copy.apm").unlink(missing_ok=True)

    pw = SecretStr(PASSWORD)
    with running_broker(h, home) as c:
        broker_proc = psutil.Process(h.procs[-1].pid)
        t0 = time.perf_counter()
        unlocked = c.call("vault.unlock", password=pw, timeout=300)
        res["unlock_s"] = time.perf_counter() - t0
        if unlocked.entries != n:
            raise RuntimeError(f"broker unlocked {unlocked.entries} entries, expected {n}")
        tokens = []
        for i in range(CONCURRENT + 2):
            created = c.call(
                "session.create",
                SessionCreateParams(label=f"bench-{i}", scope="write", ttl_seconds=7200),
                password=pw,
                timeout=120,
            )
            tokens.append(created.token.get_secret_value())
        wire_token = SecretStr(tokens[-1])

        log(f"{n:,} entries: sequential preview+commit x{r.sequential}, interleaved baselines")
        shim = Shim(h, home, tokens[-2])
        previews: list[float] = []
        commits: list[float] = []
        pairs: list[float] = []
        status: list[float] = []
        wire: list[float] = []
        for i in range(-2, r.sequential):  # two warm-up rounds
            t0 = time.perf_counter()
            shown = shim.tool("add_entry", add_args("seq", i + 2))
            t1 = time.perf_counter()
            done = shim.tool("add_entry", {"tx_id": shown["tx_id"], "approve": True})
            t2 = time.perf_counter()
            if done.get("status") != "committed" or not done.get("receipt"):
                raise RuntimeError(f"commit did not land: {done}")
            shim.tool("tx_status", {"tx_id": shown["tx_id"]})
            t3 = time.perf_counter()
            c.call("entry.add", wire_add("wire", i + 2), token=wire_token, timeout=300)
            t4 = time.perf_counter()
            if i >= 0:
                previews.append(t1 - t0)
                commits.append(t2 - t1)
                pairs.append(t2 - t0)
                status.append(t3 - t2)
                wire.append(t4 - t3)
        res["mcp_preview"] = stats(previews)
        res["mcp_commit"] = stats(commits)
        res["mcp_tx_status"] = stats(status)
        res["wire_entry_add"] = stats(wire)
        res["sequential_commits_per_s"] = len(pairs) / sum(pairs)

        log(f"{n:,} entries: {CONCURRENT} sessions x{r.per_session} commits at once")
        shims = [Shim(h, home, tokens[k]) for k in range(CONCURRENT)]
        barrier = threading.Barrier(CONCURRENT + 1)
        errors: list[BaseException] = []
        latencies: list[float] = []
        lock = threading.Lock()

        def agent(k: int) -> None:
            try:
                barrier.wait()
                for j in range(r.per_session):
                    t0 = time.perf_counter()
                    shown = shims[k].tool("add_entry", add_args(f"c{k}", j))
                    done = shims[k].tool("add_entry", {"tx_id": shown["tx_id"], "approve": True})
                    if done.get("status") != "committed":
                        raise RuntimeError(f"commit did not land: {done}")
                    with lock:
                        latencies.append(time.perf_counter() - t0)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=agent, args=(k,), daemon=True) for k in range(CONCURRENT)
        ]
        for th in threads:
            th.start()
        # CPU seconds (user + system) the broker and the shims spend on the concurrent phase:
        # per commit, a figure a busy shared machine changes far less than commits/s
        procs = [broker_proc, *(psutil.Process(s.proc.pid) for s in shims)]
        cpu0 = [cpu_s(p) for p in procs]
        barrier.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join(timeout=900)
        wall = time.perf_counter() - t0
        cpu = [cpu_s(p) - c0 for p, c0 in zip(procs, cpu0, strict=True)]
        res["concurrent_cpu_ms_per_commit"] = {
            "broker": cpu[0] * 1000 / max(1, len(latencies)),
            "shims": sum(cpu[1:]) * 1000 / max(1, len(latencies)),
        }
        if errors:
            raise RuntimeError(f"concurrent agent failed: {errors[0]!r}")
        res["concurrent_commits_per_s"] = len(latencies) / wall
        res["concurrent_pair"] = stats(latencies)
        total = c.call("entry.list", EntryListParams(limit=1), token=wire_token, timeout=300)
        expected = n + (r.sequential + 2) * 2 + CONCURRENT * r.per_session
        if total.total != expected:
            raise RuntimeError(f"vault holds {total.total} entries, expected {expected}")
        res["entries_after"] = total.total
    return res


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


# --------------------------------------------------------------------------- report


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError):
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    return None


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "commit": _git("rev-parse", "--short", "HEAD"),
        "broker_tree_modified": bool(_git("status", "--porcelain", "--", "broker", "shim")),
        "loadavg_start": list(os.getloadavg()),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    }


def _ms(x: float) -> str:
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    if x >= 100:
        return f"{x:.0f} ms"
    if x >= 10:
        return f"{x:.1f} ms"
    return f"{x:.2f} ms"


def report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    commit = (m["commit"] or "?") + (
        " + uncommitted changes under broker/ or shim/" if m["broker_tree_modified"] else ""
    )
    lines = [
        f"apm writes benchmark ({doc['mode']}) — {m['date']}, commit {commit}",
        f"machine: {m['cpu_count']} CPUs {m['cpu']}; Python {m['python']}; load average "
        + "/".join(f"{x:.1f}" for x in m["loadavg_start"])
        + " at start, "
        + "/".join(f"{x:.1f}" for x in m["loadavg_end"])
        + " at end",
        f"command: {m['command']}",
        "",
        "Driven through the MCP tools via the real apm-mcp shim (raw JSON-RPC over pipes) in front",
        "of a real broker; write session, policy agent. commit = add_entry {tx_id, approve: true}.",
        "p99 is nearest-rank (the max when n < 100).",
    ]
    for s in doc["sizes"]:
        raw = s["raw_save"]
        save = raw["steps"]["Vault.save() (all of it)"]
        lines += [
            "",
            f"-- {s['entries']:,} entries: vault file {raw['file_bytes'] / 1e6:.1f} MB; built in "
            f"{s['build_s']:.1f} s; broker unlock {s['unlock_s']:.2f} s",
            f"{'what':<44} {'p50':>9} {'p99':>9} {'n':>4}",
        ]
        rows = (
            ("MCP add_entry commit", s["mcp_commit"]),
            ("MCP add_entry preview", s["mcp_preview"]),
            ("MCP tx_status (relay + SDK floor)", s["mcp_tx_status"]),
            ("baseline: wire entry.add (session, 1 phase)", s["wire_entry_add"]),
            ("baseline: raw Vault.save() in-process", save),
            (f"{CONCURRENT} sessions at once: preview+commit each", s["concurrent_pair"]),
        )
        for label, st in rows:
            lines.append(f"{label:<44} {_ms(st['p50_ms']):>9} {_ms(st['p99_ms']):>9} {st['n']:>4}")
        lines.append(
            f"commits/s: one session back to back {s['sequential_commits_per_s']:.1f}; "
            f"{CONCURRENT} sessions at once {s['concurrent_commits_per_s']:.1f} (aggregate); "
            f"raw saves/s {1000 / save['p50_ms']:.1f}"
        )
        cpu = s.get("concurrent_cpu_ms_per_commit")
        if cpu is not None:
            lines.append(
                f"CPU per commit, {CONCURRENT} sessions at once (preview + commit, user+sys): "
                f"broker {cpu['broker']:.2f} ms, the {CONCURRENT} shims {cpu['shims']:.2f} ms"
            )
        lines.append(
            f"commit p50 / raw save p50 = {s['mcp_commit']['p50_ms'] / save['p50_ms']:.2f}; "
            f"commit p50 / wire entry.add p50 = "
            f"{s['mcp_commit']['p50_ms'] / s['wire_entry_add']['p50_ms']:.2f}"
        )
        steps = [
            f"{k} {_ms(v['p50_ms'])}"
            for k, v in raw["steps"].items()
            if not k.startswith("Vault.save")
        ]
        lines.append("raw save steps (p50): " + "; ".join(steps))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1k entries, fewer repetitions")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    h = Harness()
    doc: dict[str, Any] = {"mode": plan.mode, "machine": machine()}
    try:
        doc["sizes"] = [bench_size(h, n, r) for n, r in plan.reps.items()]
    finally:
        h.close()
    doc["elapsed_s"] = time.perf_counter() - started
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    print(report(doc))
    print(f"\n(total {doc['elapsed_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
