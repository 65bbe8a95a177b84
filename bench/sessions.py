"""Benchmark: per-request session validation cost with 10 and with 10,000 sessions loaded.

    .venv/bin/python bench/sessions.py                  # about a minute on 2 cores
    .venv/bin/python bench/sessions.py --iterations 2000 --json out.json

Two levels, each with N = 10 and N = 10,000 sessions in the table:

1. core: `SessionStore.authenticate(token, peer_pid)` alone: token hash lookup, state, host,
   a pid binding to this process's parent and a pin, checked against the real ancestry of
   this process (real psutil, cache warm: one create_time read per request, as in the broker);
2. dispatch: `dispatch.handle()` on the bytes of an `entry.list` request carrying the token,
   through a real State with an unlocked vault that holds the N sessions (envelope, lock gate,
   authentication, a 20-entry listing, response encoding; no transport, audit log off).

The token used is drawn at random from the N sessions on every request. Figures are printed
(median and p99 per request) with the 10k/10 ratio; nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from broker.core.bindings import AncestryCache, walk_ancestry  # noqa: E402
from broker.core.crypto import KdfParams, normalize_password  # noqa: E402
from broker.core.key_cache import LockPolicy, OpenVault  # noqa: E402
from broker.core.sessions import CreateSpec, SessionStore  # noqa: E402
from broker.core.vault import Change, Vault  # noqa: E402
from broker.paths import Paths  # noqa: E402
from broker.server import daemon, dispatch  # noqa: E402
from broker.server.peer import Peer  # noqa: E402
from broker.server.state import State  # noqa: E402
from broker.wire.protocol import PROTOCOL_VERSION, Auth, Request, Response  # noqa: E402

_ = daemon  # importing the daemon registers every route, as in the real broker

PASSWORD = "bench password"
FAST_KDF = KdfParams("bench", 8 * 1024, 1, 1)  # only the vault's creation pays it, once
HOST = "bench-host"
SIZES = (10, 10_000)


def now() -> datetime:
    return datetime.now(UTC)


def make_store(n: int, ancestry: AncestryCache) -> tuple[SessionStore, list[str]]:
    """N sessions: host-bound, pid-bound to this process's parent, pinned on first use."""
    store = SessionStore([], clock=now, ancestry=ancestry, host=HOST)
    parent = os.getppid()
    tokens = []
    # delegating walks the bound pid's ancestry once per session; that is the owner's cost,
    # not a request's, so setting up 10,000 of them reuses one walk
    real_walk = ancestry.walk
    ancestry.walk = functools.lru_cache(maxsize=None)(real_walk)
    for i in range(n):
        spec = CreateSpec(
            label=f"bench {i}",
            scope="read",
            ttl=timedelta(hours=8),
            idle_seconds=3600,
            pid=parent,
            pin=True,
        )
        token, _ = store.create(spec)
        tokens.append(token)
    ancestry.walk = real_walk
    me = os.getpid()
    for token in tokens:  # first use pins each session (a durable write in the broker)
        store.authenticate(token, me)
    return store, tokens


def timed(fn: Callable[[str], object], tokens: list[str], iterations: int) -> list[float]:
    """Per-call wall time in microseconds, the token drawn at random for each call."""
    rng = random.Random(7)
    picks = [rng.choice(tokens) for _ in range(iterations)]
    for token in picks[: min(200, iterations)]:  # warm up: ancestry cache, branches
        fn(token)
    out = []
    clock = time.perf_counter_ns
    for token in picks:
        t0 = clock()
        fn(token)
        out.append((clock() - t0) / 1000)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered),
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean_us": statistics.fmean(ordered),
        "n": len(ordered),
    }


def bench_core(n: int, iterations: int) -> dict[str, float]:
    ancestry = AncestryCache()
    store, tokens = make_store(n, ancestry)
    me = os.getpid()
    gc.collect()
    return summary(timed(lambda t: store.authenticate(t, me), tokens, iterations))


def bench_dispatch(n: int, iterations: int, work: Path) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix=f"s{n}-", dir=work))
    paths = Paths(
        vault=home / "vault.apm",
        config_dir=home / "config",
        state_dir=home / "state",
        runtime_dir=home / "run",
        broker_addr=f"ipc://{home}/run/broker.sock",
    )
    paths.state_dir.mkdir(parents=True)
    ancestry = AncestryCache()
    vault = Vault.create(paths.vault, normalize_password(PASSWORD), FAST_KDF)
    for i in range(20):
        change = Change(fields={"service": f"svc{i}"}, secrets={"key": f"k{i}"}, remove_fields=[])
        vault.add("api_key", f"entry-{i:02d}", "default", ["bench"], None, None, change)
    seed, tokens = make_store(n, ancestry)
    vault.extra["sessions"] = seed.dump()
    state = State(
        paths=paths, cache=OpenVault(LockPolicy()), ancestry=ancestry, host=HOST, clock=now
    )
    state.cache.put(vault)
    loop = asyncio.new_event_loop()
    peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    frames = {
        t: Request(
            v=PROTOCOL_VERSION,
            method="entry.list",
            params={},
            auth=Auth(token=SecretStr(t)),
            client="bench",
        ).encode()
        for t in tokens
    }

    def one(token: str) -> None:
        raw = loop.run_until_complete(dispatch.handle(state, frames[token], peer))
        if b'"ok":true' not in raw:
            raise RuntimeError(Response.model_validate_json(raw).error)

    one(tokens[0])  # builds the session store from the vault (once per unlock)
    gc.collect()
    try:
        return summary(timed(one, tokens, iterations))
    finally:
        state.cache.lock()
        state.kdf_pool.shutdown(wait=True)
        state.io_pool.shutdown(wait=True)
        loop.close()


def cold_walk_us(repeats: int = 200) -> float:
    me = os.getpid()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        walk_ancestry(me)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(samples)


def warm_ancestry_us(repeats: int = 2000) -> float:
    """One warm AncestryCache.get: the create_time read every binding check starts with."""
    cache = AncestryCache()
    me = os.getpid()
    cache.get(me)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        cache.get(me)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(samples)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "psutil": psutil.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--iterations", type=int, default=20_000, help="requests timed per case")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    info = machine()
    print(f"# bench/sessions.py  {info['date']}")
    print(f"# {info['cpu']} x{info['cpu_count']}, {info['platform']}, Python {info['python']}")
    print(f"# load average at start: {info['loadavg_start']}")
    print(f"# command: {info['command']}")
    walk = cold_walk_us()
    warm = warm_ancestry_us()
    print(f"# reference: a cold ancestry walk of this process (psutil): {walk:.0f} us median")
    print(f"# reference: a warm ancestry cache hit (one create_time read): {warm:.1f} us median")
    print()

    results: dict[str, dict[int, dict[str, float]]] = {"core": {}, "dispatch": {}}
    work = Path(tempfile.mkdtemp(prefix="apm-bench-sessions-"))
    try:
        for n in SIZES:
            results["core"][n] = bench_core(n, args.iterations)
            results["dispatch"][n] = bench_dispatch(n, args.iterations, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = f"{'level':<10}{'sessions':>10}{'median':>12}{'p99':>12}{'mean':>12}"
    print(header)
    print("-" * len(header))
    for level, by_n in results.items():
        for n, r in by_n.items():
            print(
                f"{level:<10}{n:>10,}{r['median_us']:>10.1f}us{r['p99_us']:>10.1f}us"
                f"{r['mean_us']:>10.1f}us"
            )
    print()
    ratios: dict[str, dict[str, float]] = {}
    for level, by_n in results.items():
        small, big = by_n[SIZES[0]], by_n[SIZES[1]]
        ratios[level] = {
            "median": big["median_us"] / small["median_us"],
            "p99": big["p99_us"] / small["p99_us"],
        }
        print(
            f"ratio 10,000 / 10 sessions, {level}: median x{ratios[level]['median']:.2f}, "
            f"p99 x{ratios[level]['p99']:.2f}"
        )
    if args.json:
        doc = {
            "machine": info,
            "iterations": args.iterations,
            "cold_walk_us": walk,
            "warm_ancestry_us": warm,
            "results": {lvl: {str(n): r for n, r in by_n.items()} for lvl, by_n in results.items()},
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
