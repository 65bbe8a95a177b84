"""One-shot `apm get|totp|run` against a bare pyzmq one-shot client, and the APM-style baseline.

Prints, from one run:
- wall time of whole `apm get NAME`, `apm totp NAME` and `apm run --env K=apm://... -- /bin/true`
  processes (with a session token, so no KDF), each paired with a bare python process that
  imports zmq, connects, does one round trip with the broker and exits (the floor for any
  one-shot client): the two run in turn and the ratio is taken pair by pair (#14.9's target
  is <= 2x); and `apm get` with the master password (one Argon2id, the owner path);
- the "APM-style" cost per call: re-derive Argon2id (64 MiB, t=3, p=2) and decrypt + parse the
  whole vault, as the original Go APM does on every MCP call, at 1k / 10k / 100k entries,
  beside apm's in-memory lookup + open of one sealed field.

Usage: .venv/bin/python bench/oneshot.py [--quick] [--pairs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.core import crypto  # noqa: E402
from broker.core.vault import StoredEntry, StoredField, Vault  # noqa: E402

PY = str(Path(sys.executable))
PASSWORD = "bench-master-password"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env["APM_HOME"] = str(home)
    return env


def apm(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "broker.cli.main", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )


BARE = """
import json, sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
s.send(json.dumps({"v": 1, "id": "x", "method": "broker.ping"}).encode())
assert s.poll(5000); s.recv(); s.close(); ctx.term()
"""


def timed(argv: list[str], env: dict[str, str], stdin: str = "", n: int = 10) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(
            argv, input=stdin, env=env, capture_output=True, text=True, check=True, cwd=ROOT
        )
        out.append((time.perf_counter() - t0) * 1000)
    return out


def paired(
    a: list[str], a_env: dict[str, str], b: list[str], b_env: dict[str, str], n: int
) -> tuple[list[float], list[float], list[float]]:
    """A and B in turn (A B A B ...), one warm-up pair; returns A's and B's times (ms) and the
    ratio A/B of each pair, so a machine whose speed drifts still gives a meaningful ratio."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(n + 1):
        (x,) = timed(a, a_env, n=1)
        (y,) = timed(b, b_env, n=1)
        if i:
            ta.append(x)
            tb.append(y)
    return ta, tb, [x / y for x, y in zip(ta, tb, strict=True)]


TOTP_SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits, a test seed


def oneshot(n: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="apmb-", dir="/tmp"))
    env = run_env(home)
    try:
        apm(env, "init", "--profile", "standard", "--password-stdin", stdin=PASSWORD + "\n")
        for type_, name, value in (
            ("api_key", "svc", "sk-bench-value"),
            ("totp", "otp", TOTP_SEED),
        ):
            apm(
                env,
                "add",
                type_,
                name,
                "--from-stdin",
                "--password-stdin",
                stdin=f"{PASSWORD}\n{value}\n",
            )
        token = json.loads(
            apm(
                env,
                "delegate",
                "--scope",
                "secrets",
                "--json",
                "--password-stdin",
                stdin=PASSWORD + "\n",
            ).stdout
        )["token"]
        addr = f"ipc://{home}/run/broker.sock"
        senv = {**env, "APM_EPHEMERAL_ID": token}
        bare = [PY, "-c", BARE, addr]
        cli = [PY, "-m", "broker.cli.main"]
        out: dict[str, float] = {}
        hot = (
            ("get", [*cli, "get", "svc"]),
            ("totp", [*cli, "totp", "otp"]),
            ("run", [*cli, "run", "--env", "K=apm://default/svc/key", "--", "/bin/true"]),
        )
        for label, argv in hot:
            ta, tb, ratios = paired(argv, senv, bare, env, n)
            out[f"apm_{label}_session_ms"] = statistics.median(ta)
            out[f"bare_vs_{label}_ms"] = statistics.median(tb)
            out[f"apm_{label}_ratio"] = statistics.median(ratios)
            out[f"apm_{label}_ratio_max"] = max(ratios)
        out["bare_pyzmq_oneshot_ms"] = statistics.median(
            [out[f"bare_vs_{label}_ms"] for label, _ in hot]
        )
        owner = timed(
            [*cli, "get", "svc", "--password-stdin"], env, stdin=PASSWORD + "\n", n=max(3, n // 3)
        )
        out["apm_get_owner_ms"] = statistics.median(owner)
        return out
    finally:
        subprocess.run(
            [PY, "-m", "broker.cli.main", "broker", "stop"],
            env=env,
            capture_output=True,
            check=False,
        )
        shutil.rmtree(home, ignore_errors=True)


def build_vault(path: Path, n: int) -> Vault:
    params = crypto.PROFILES["standard"]
    v = Vault.create(path, crypto.normalize_password(PASSWORD), params)
    now = v._clock()
    for i in range(n):
        eid = str(uuid.uuid4())
        v.entries[eid] = StoredEntry(
            id=eid,
            name=f"entry-{i:06d}",
            type="login",
            space="default",
            tags=["bench"],
            url=f"https://service-{i}.example",
            created_at=now,
            updated_at=now,
            fields={
                "username": StoredField(secret=False, value=f"user{i}"),
                "password": StoredField(
                    secret=True, sealed=v._seal(eid, "password", f"pw-{i:06d}-xyz")
                ),
            },
        )
    v._reindex()
    v.save()
    return v


def apm_style(sizes: list[int], n: int) -> list[dict[str, float]]:
    rows = []
    for size in sizes:
        d = Path(tempfile.mkdtemp(prefix="apmb-"))
        try:
            vault = build_vault(d / "vault.apm", size)
            target = vault.resolve(f"entry-{size // 2:06d}")
            per_call = []
            for _ in range(n):
                t0 = time.perf_counter()
                opened = Vault.open(d / "vault.apm", crypto.normalize_password(PASSWORD))
                opened.reveal(opened.resolve(target.name), "password")
                opened.close()
                per_call.append((time.perf_counter() - t0) * 1000)
            mem = []
            for _ in range(max(200, n * 20)):
                t0 = time.perf_counter()
                vault.reveal(vault.resolve(target.id), "password")
                mem.append((time.perf_counter() - t0) * 1e6)
            rows.append(
                {
                    "entries": size,
                    "apm_style_per_call_ms": statistics.median(per_call),
                    "apm_in_memory_lookup_open_us": statistics.median(mem),
                    "ratio": statistics.median(per_call) * 1000 / statistics.median(mem),
                }
            )
            vault.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--pairs", type=int, help="pairs per one-shot command (default 3 quick, 15)")
    args = ap.parse_args()
    n = args.pairs or (3 if args.quick else 15)
    sizes = [1000] if args.quick else [1000, 10_000, 100_000]
    print(f"# one-shot clients (median of {n} pairs, wall time of a whole process)")
    print("# each pair: the apm command, then the bare client, in turn; ratio = median of A/B")
    o = oneshot(n)
    print(f"bare pyzmq one-shot (import, connect, ping, exit): {o['bare_pyzmq_oneshot_ms']:.1f} ms")
    for label, what in (
        ("get", "apm get NAME"),
        ("totp", "apm totp NAME"),
        ("run", "apm run --env K=apm://... -- /bin/true"),
    ):
        print(
            f"{what + ' (session)':<48} {o[f'apm_{label}_session_ms']:6.1f} ms  "
            f"{o[f'apm_{label}_ratio']:.2f}x the bare client (worst pair "
            f"{o[f'apm_{label}_ratio_max']:.2f}x; target <= 2x)"
        )
    print(
        f"apm get with the master password: {o['apm_get_owner_ms']:.1f} ms "
        f"(full path; one Argon2id 64 MiB in the broker)"
    )
    print("\n# APM-style baseline: Argon2id + decrypt and parse the whole vault on every call")
    rows = apm_style(sizes, 3 if args.quick else 5)
    for r in rows:
        print(
            f"{r['entries']:>7} entries: APM-style {r['apm_style_per_call_ms']:8.1f} ms/call; "
            f"apm in memory {r['apm_in_memory_lookup_open_us']:6.1f} us "
            f"({r['ratio']:,.0f}x less)"
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"oneshot": o, "apm_style": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
