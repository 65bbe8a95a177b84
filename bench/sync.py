"""Benchmark: synced spaces over a real 3-member etcd cluster (TLS, loopback).

    .venv/bin/python bench/sync.py --quick      # ~100 samples, 1,000 entries of throughput
    .venv/bin/python bench/sync.py              # 500 samples, 5,000 entries
    .venv/bin/python bench/sync.py --json out.json

Two devices (A writes, B follows) with their own replicas, each with its own etcd client, as
two brokers would hold them (core/sync.py; no broker process, so the figure is the sync path,
not the CLI). Nothing is asserted about timings.

- propagation: A commits one entry (seal + etcd txn comparing mod_revision); the clock stops
  when B's replication thread has verified it (AEAD, version) and handed it to its vault
  callback. Target: p99 <= 200 ms on loopback.
- baseline: a bare etcd put to the first event on a watch of that key, same cluster, same run.
- throughput: A commits N entries in txns of 100; entries/s until B has applied all of them;
  and one-entry commits/s back to back (each a txn).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.core.sync import Device, SyncedSpace  # noqa: E402
from broker.core.sync_etcd import EtcdClient, TlsFiles  # noqa: E402
from tests.etcd_cluster import EtcdCluster  # noqa: E402

DOC = {
    "name": "bench",
    "type": "login",
    "fields": {
        "username": {"secret": False, "value": "someone"},
        "password": {"secret": True, "value": "x" * 24},
    },
}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    samples = 100 if args.quick else 500
    bulk = 1000 if args.quick else 5000
    cluster = EtcdCluster.start()
    tmp = Path(tempfile.mkdtemp(prefix="apm-bench-sync-"))
    tls = TlsFiles(**cluster.client_tls())
    out: dict[str, Any] = {}
    a_client, b_client = EtcdClient(cluster.endpoints, tls), EtcdClient(cluster.endpoints, tls)
    a = b = None
    try:
        space = "sp-" + secrets.token_hex(4)
        dev_a, dev_b = Device.new(), Device.new()
        a = SyncedSpace.create(a_client, dev_a, space, tmp / "a.db")
        a.start()
        jc = SyncedSpace.request_join(b_client, dev_b, a.invite())
        a.approve(dev_b.id)
        b = SyncedSpace(b_client, dev_b, space, jc.admin_ed, tmp / "b.db")
        seen: dict[str, float] = {}
        cond = threading.Condition()

        def on_change(items: list[tuple[str, Any]]) -> None:
            now = time.perf_counter()
            with cond:
                for eid, _ in items:
                    seen.setdefault(eid, now)
                cond.notify_all()

        b.on_change = on_change
        b.start()
        time.sleep(0.5)

        # propagation, one entry at a time
        lat: list[float] = []
        for i in range(samples + 10):
            eid = f"p{i}"
            t0 = time.perf_counter()
            a.put(eid, DOC)
            with cond:
                cond.wait_for(lambda eid=eid: eid in seen, timeout=10)
            if eid in seen and i >= 10:  # 10 warm-up rounds
                lat.append((seen[eid] - t0) * 1000)
        out["propagation_ms"] = {
            "p50": round(statistics.median(lat), 2),
            "p99": round(pct(lat, 99), 2),
            "max": round(max(lat), 2),
            "n": len(lat),
        }

        # baseline: bare put -> watch event
        base: list[float] = []
        stop = threading.Event()
        got: dict[str, float] = {}
        bcond = threading.Condition()
        probe = f"/bench/{secrets.token_hex(3)}/"
        start_rev = a_client.put(probe + "start", b"0")

        def watcher() -> None:
            try:
                for batch in b_client.watch(probe, start_rev + 1, stop, idle=5.0):
                    now = time.perf_counter()
                    with bcond:
                        for ev in batch.events:
                            got.setdefault(ev.kv.key, now)
                        bcond.notify_all()
            except Exception:  # noqa: S110 - the baseline just ends
                pass

        th = threading.Thread(target=watcher, daemon=True)
        th.start()
        time.sleep(0.3)
        for i in range(samples):
            key = f"{probe}{i}"
            t0 = time.perf_counter()
            a_client.put(key, b"v")
            with bcond:
                bcond.wait_for(lambda key=key: key in got, timeout=10)
            if key in got:
                base.append((got[key] - t0) * 1000)
        stop.set()
        out["baseline_put_to_watch_ms"] = {
            "p50": round(statistics.median(base), 2),
            "p99": round(pct(base, 99), 2),
            "n": len(base),
        }

        # throughput: batches of 100 per txn, until B applied them all
        ids = [f"t{i}" for i in range(bulk)]
        t0 = time.perf_counter()
        rev = 0
        for i in range(0, bulk, 100):
            rev = a.commit(a.prepare([(eid, DOC) for eid in ids[i : i + 100]]))
        committed = time.perf_counter() - t0
        b.wait_applied(rev, timeout=120)
        applied = time.perf_counter() - t0
        out["throughput"] = {
            "entries": bulk,
            "commit_entries_per_s": round(bulk / committed),
            "synced_entries_per_s": round(bulk / applied),
        }
        n1 = samples
        t0 = time.perf_counter()
        for i in range(n1):
            a.put(f"s{i}", DOC)
        out["throughput"]["single_commits_per_s"] = round(n1 / (time.perf_counter() - t0))
    finally:
        for s in (a, b):
            if s is not None:
                s._stop.set()
        for s in (a, b):
            if s is not None:
                s.stop()
        a_client.close()
        b_client.close()
        cluster.stop()
    p = out["propagation_ms"]
    print(
        f"propagation A commit -> B verified: p50 {p['p50']} ms, p99 {p['p99']} ms, "
        f"max {p['max']} ms (n={p['n']}; target p99 <= 200 ms)"
    )
    bl = out["baseline_put_to_watch_ms"]
    print(f"baseline bare etcd put -> watch event: p50 {bl['p50']} ms, p99 {bl['p99']} ms")
    t = out["throughput"]
    print(
        f"throughput: {t['entries']} entries in txns of 100: {t['commit_entries_per_s']}/s "
        f"committed, {t['synced_entries_per_s']}/s applied on B; one-entry commits "
        f"{t['single_commits_per_s']}/s"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
