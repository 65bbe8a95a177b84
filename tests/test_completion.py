"""Completion scripts and the man page come from the parser; bash really loads the script."""

from __future__ import annotations

import shutil
import subprocess
import sys

from broker.cli.completion import bash, fish, man, zsh
from broker.cli.main import build_parser

TOP = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def _complete(script: str, *words: str) -> list[str]:
    """Run the generated bash function for `apm WORDS...` (the last word is being typed)."""
    arr = " ".join("'" + w.replace("'", "'\\''") + "'" for w in ("apm", *words))
    call = f'COMP_WORDS=({arr}); COMP_CWORD={len(words)}; _apm; printf "%s\\n" "${{COMPREPLY[@]}}"'
    prog = f"{script}\n{call}"
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", prog],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_loads_the_generated_script_and_completes_commands_options_and_choices() -> None:
    script = bash()
    assert sorted(set(_complete(script, "")) & set(TOP)) == TOP
    assert _complete(script, "ge") == ["get", "generate"]
    assert set(_complete(script, "get", "svc", "--c")) == {"--clip", "--clear-after"}
    assert _complete(script, "import", "keepass", "f", "--on-duplicate", "") == [
        "skip",
        "rename",
        "overwrite",
    ]
    assert set(_complete(script, "env", "")) >= {"scan", "migrate"}
    assert _complete(script, "credential", "s") == ["store"]
    assert _complete(script, "completion", "") == ["bash", "zsh", "fish"]


def test_the_installed_apm_prints_a_script_bash_accepts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli.main", "completion", "bash"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    check = subprocess.run(
        ["bash", "--norc", "-c", out + "\ncomplete -p apm"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "_apm" in check.stdout


def test_zsh_and_fish_scripts_name_every_command() -> None:
    z, f = zsh(), fish()
    assert z.startswith("#compdef apm")
    for cmd in TOP:
        assert f"'_root:{cmd}'" in z
        assert f"-a '{cmd}'" in f
    for shell, text, check in (("zsh", z, ["-n"]), ("fish", f, ["--no-execute"])):
        exe = shutil.which(shell)
        if exe:  # a syntax check where the shell exists (it is not a dependency)
            proc = subprocess.run(
                [exe, *check], input=text, capture_output=True, text=True, timeout=30
            )
            assert proc.returncode == 0, proc.stderr


def test_the_man_page_lists_every_command_and_renders_without_warnings() -> None:
    page = man()
    assert page.startswith(".TH APM 1 ")
    for cmd in TOP:
        assert f".SS apm {cmd}" in page
    assert "\\-\\-clear\\-after" in page
    groff = shutil.which("groff")
    if groff:
        proc = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww"],
            input=page,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0
        assert proc.stderr == "", proc.stderr
        assert "apm import" in proc.stdout
