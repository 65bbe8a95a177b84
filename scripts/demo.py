"""The quick-start demo: a fresh vault under a temporary APM_HOME, driven through the real broker.

Run with `make demo`. Nothing outside the temporary directory is touched, and it is removed at
the end. The demo master password is fed on stdin and never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DEMO_PASSWORD = "demo-" + secrets.token_urlsafe(12)  # fed on stdin only


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def apm(
    env: dict[str, str], *args: str, stdin: str = "", password: bool = False, show: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [PY, "-m", "broker.cli.main", *args]
    if password:
        argv.append("--password-stdin")
        stdin = DEMO_PASSWORD + "\n" + stdin
    shown = " ".join(["apm", *args, *(["--password-stdin"] if password else [])])
    if show:
        print(f"$ {shown}", flush=True)
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    if show:
        for stream in (proc.stdout, proc.stderr):
            if stream.strip():
                print("  " + stream.rstrip().replace("\n", "\n  "), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed: {shown} (exit {proc.returncode})")
    return proc


async def mcp_demo(env: dict[str, str], tokens: dict[str, str]) -> None:
    from mcp import Client, StdioServerParameters  # imported here: ~0.5 s

    shim = str(Path(PY).parent / "apm-mcp")

    def params(token: str) -> StdioServerParameters:
        return StdioServerParameters(
            command=shim, args=[], env={"APM_HOME": env["APM_HOME"], "APM_EPHEMERAL_ID": token}
        )

    def show(label: str, result: object) -> None:
        body = getattr(result, "structured_content", None)
        err = " (error)" if getattr(result, "is_error", False) else ""
        if err:  # an error's {code, message, hint} is in _meta, not in structuredContent
            body = (getattr(result, "meta", None) or {}).get("apm/error")
        print(f"  {label}{err}: {json.dumps(body, default=str)[:300]}", flush=True)

    async with Client(params(tokens["read"]), mode="legacy") as c:
        tools = await c.list_tools()
        print(f"  read session, tools: {[t.name for t in tools.tools]}")
        hits = await c.call_tool("search_entries", {"query": "git"})
        names = [h["entry"]["name"] for h in hits.structured_content["hits"]]
        print(f"  search_entries(git): {names}")
        entry = await c.call_tool("get_entry", {"entry": "github"})
        fields = entry.structured_content["entry"]["fields"]
        print(f"  get_entry(github) fields: {fields}")
        show(
            "decrypt_entry(github) with a read session",
            await c.call_tool("decrypt_entry", {"entry": "github"}),
        )
    async with Client(params(tokens["secrets"]), mode="auto") as c:
        tools = await c.list_tools()
        print(f"  secrets session (2026-07-28 protocol), tools: {[t.name for t in tools.tools]}")
        show("decrypt_entry(github)", await c.call_tool("decrypt_entry", {"entry": "github"}))
        show("get_totp(github-2fa)", await c.call_tool("get_totp", {"entry": "github-2fa"}))


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="apm-demo-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("APM_")}
    env["APM_HOME"] = str(home)
    print(f"apm demo: a throwaway vault under APM_HOME={home}")
    try:
        banner("1. create a vault (this starts the broker, which holds the key in memory)")
        apm(env, "init", "--profile", "interactive", password=True)
        apm(env, "status")

        banner("2. add entries (secret values come from stdin or a no-echo prompt, never argv)")
        samples = [
            (
                [
                    "login",
                    "github",
                    "--field",
                    "username=octocat",
                    "--url",
                    "https://github.com",
                    "--tag",
                    "dev",
                ],
                "demo-github-password",
            ),
            (["api_key", "openai", "--field", "service=OpenAI", "--tag", "ai"], "sk-demo-0000"),
            (
                [
                    "database",
                    "prod-db",
                    "--field",
                    "host=db.internal",
                    "--field",
                    "port=5432",
                    "--field",
                    "user=app",
                    "--space",
                    "work",
                ],
                "demo-db-password",
            ),
            (
                ["totp", "github-2fa", "--tag", "dev"],
                "otpauth://totp/GitHub:octocat?secret=JBSWY3DPEHPK3PXP&issuer=GitHub",
            ),
        ]
        apm(env, "space", "add", "work", password=True)
        for args, secret in samples:
            apm(env, "add", *args, "--from-stdin", stdin=secret + "\n", password=True)

        banner("3. list and search (metadata only)")
        apm(env, "ls", password=True)
        apm(env, "search", "git", password=True)
        apm(env, "show", "prod-db", password=True)

        banner("4. get a secret value and a TOTP code through the broker")
        apm(env, "get", "github", password=True)
        apm(env, "totp", "github-2fa", password=True)

        banner("5. delegate sessions to an AI client (the token is shown once; we keep it hidden)")
        tokens = {}
        for scope in ("read", "secrets"):
            out = apm(
                env,
                "delegate",
                "--scope",
                scope,
                "--ttl",
                "10m",
                "--label",
                f"demo {scope}",
                "--json",
                password=True,
                show=False,
            )
            doc = json.loads(out.stdout)
            tokens[scope] = doc["token"]
            print(
                f"$ apm delegate --scope {scope} --ttl 10m --json  ->  accessor "
                f"{doc['accessor']}, scopes {doc['scopes']}, bindings {doc['bindings']}"
            )
        apm(env, "session", "ls", password=True)

        banner("6. a real MCP client (the mcp SDK's stdio client) drives the apm-mcp shim")
        asyncio.run(mcp_demo(env, tokens))

        banner("7. lock: every read is refused until the owner unlocks again")
        apm(env, "lock")
        locked = subprocess.run(
            [PY, "-m", "broker.cli.main", "get", "github", "--password-stdin"],
            input=DEMO_PASSWORD + "\n",
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        print("$ apm get github --password-stdin")
        print("  " + locked.stderr.rstrip().replace("\n", "\n  "))
        apm(env, "unlock", password=True)
    finally:
        banner("8. stop the broker (locks the vault, removes the socket)")
        subprocess.run([PY, "-m", "broker.cli.main", "broker", "stop"], env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)
    print("\ndemo finished; the temporary vault was removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
