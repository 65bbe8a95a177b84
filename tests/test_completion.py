"""Completion scripts and the man page come from the parser; bash, zsh and fish really load
the generated scripts and complete `apm ...` with them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli.completion import bash, fish, man, zsh
from broker.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent

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
    script = bash(build_parser())
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
    # entry types are not argparse choices (a plugin may add one) yet are offered
    assert _complete(script, "ls", "--type", "ss") == ["ssh_key"]
    assert "api_key" in _complete(script, "add", "")


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
    z, f = zsh(build_parser()), fish(build_parser())
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
    page = man(build_parser())
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


def ensure_shell(name: str) -> str:
    """zsh / fish from the distribution (scripts/ensure_shells.sh), installed when missing."""
    if shutil.which(name) is None:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "ensure_shells.sh")], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.fail(f"{name} is needed: {proc.stderr.strip()} (apt-get install zsh fish)")
    exe = shutil.which(name)
    assert exe is not None
    return exe


# zsh completes only inside its line editor, so a zsh in a pseudo-terminal (zsh/zpty) gets
# `apm ...` and a TAB; compadd is wrapped to print each match it is given, between two marks
# (compprefuncs / comppostfuncs) so the matches can be told from the echoed line.
ZSH_INIT = r"""
PROMPT=
fpath=($APM_COMP_DIR $fpath)
autoload -U compinit && compinit -u -D
bindkey '^M' undefined
bindkey '^J' undefined
bindkey '^I' complete-word
zstyle ':completion:*' insert-tab false
_apm_mark () { print -r -- '<<apm-mark>>' }
compprefuncs=(_apm_mark)
comppostfuncs=(_apm_mark exit)
compadd () {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return $?; fi
  typeset -a __hits
  builtin compadd -A __hits "$@"
  local ret=$?
  (( $#__hits )) && print -rl -- "<<hit>>"${^__hits}
  return $ret
}
print '<<apm-ready>>'
"""

ZSH_DRIVER = r"""
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "APM_COMP_DIR=${(q)1}; source ${(q)2}"
while zpty -r z out; do [[ $out == *'<<apm-ready>>'* ]] && break; done
zpty -w -n z "$3"$'\t'
zpty -r z out '*<<apm-mark>>*'
while zpty -r z out; do
  [[ $out == *'<<apm-mark>>'* ]] && break
  [[ $out == *'<<hit>>'* ]] && print -r -- "${${out#*<<hit>>}%%[$'\r\n']*}"
done
"""


def _zsh_complete(tmp_path: Path, line: str) -> list[str]:
    exe = ensure_shell("zsh")
    comp = tmp_path / "zfunc"
    comp.mkdir(exist_ok=True)
    (comp / "_apm").write_text(zsh(build_parser()))
    init = tmp_path / "init.zsh"
    init.write_text(ZSH_INIT)
    driver = tmp_path / "driver.zsh"
    driver.write_text(ZSH_DRIVER)
    proc = subprocess.run(
        [exe, "-f", str(driver), str(comp), str(init), line],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_zsh_loads_the_generated_function_and_completes_subcommands_and_choices(
    tmp_path: Path,
) -> None:
    top = _zsh_complete(tmp_path, "apm ")
    # the subcommands (and the top-level options), no file names at the top level
    assert sorted(w for w in top if not w.startswith("-")) == TOP
    assert "--help" in top
    assert _zsh_complete(tmp_path, "apm ge") == ["get", "generate"]
    assert _zsh_complete(tmp_path, "apm import keepass f --on-duplicate ") == [
        "skip",
        "rename",
        "overwrite",
    ]
    assert set(_zsh_complete(tmp_path, "apm plugin ")) >= {"ls", "enable", "disable"}
    assert set(_zsh_complete(tmp_path, "apm get svc --c")) == {"--clip", "--clear-after"}
    assert _zsh_complete(tmp_path, "apm search q --type to") == ["totp", "token"]


def _fish_complete(tmp_path: Path, line: str) -> list[str]:
    exe = ensure_shell("fish")
    script = tmp_path / "apm.fish"
    script.write_text(fish(build_parser()))
    proc = subprocess.run(
        [exe, "--no-config", "-c", f"source {script}; complete -C {_fish_arg(line)}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return [w.split("\t", 1)[0] for w in proc.stdout.splitlines() if w]


def _fish_arg(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_fish_loads_the_generated_script_and_completes_subcommands_and_choices(
    tmp_path: Path,
) -> None:
    assert sorted(_fish_complete(tmp_path, "apm ")) == TOP
    assert sorted(_fish_complete(tmp_path, "apm ge")) == ["generate", "get"]
    assert sorted(_fish_complete(tmp_path, "apm import keepass f --on-duplicate ")) == [
        "overwrite",
        "rename",
        "skip",
    ]
    assert set(_fish_complete(tmp_path, "apm plugin ")) >= {"ls", "enable", "disable"}
    assert sorted(_fish_complete(tmp_path, "apm ls --type to")) == ["token", "totp"]
