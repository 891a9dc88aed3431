"""Man pages and shell completions: generated from the parser, current, shipped in the
wheel, installed where ``man`` and the shells look, and working."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASH = ROOT / "share" / "bash-completion" / "completions" / "btrdelta"
ZSH = ROOT / "share" / "zsh" / "site-functions" / "_btrdelta"


def test_generated_files_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gen_cli_files.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_man_pages_render_with_their_examples() -> None:
    page = ROOT / "share" / "man" / "man1" / "btrdelta-receive.1"
    out = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, check=True,
                         env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"}).stdout
    assert "BTRDELTA-RECEIVE(1)" in out
    assert "--max-errors" in out
    examples = out.split("EXAMPLES", 1)[1]
    # example lines are not refilled: each is one line, as in --help
    assert "\n       btrdelta receive -q --json -f A.stream /target" in examples


def _complete(*words: str) -> list[str]:
    script = (f"source {BASH}\n"
              "COMP_WORDS=(\"$@\"); COMP_CWORD=$((${#COMP_WORDS[@]}-1))\n"
              "COMP_LINE=\"${COMP_WORDS[*]}\"; COMP_POINT=${#COMP_LINE}\n"
              "_shtab_btrdelta; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    out = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return sorted(out.split())


def test_bash_completion_knows_commands_options_and_paths() -> None:
    assert _complete("btrdelta", "re") == ["receive", "replicate", "repo"]
    assert _complete("btrdelta", "delta", "ex") == ["expand"]
    assert "--max-errors" in _complete("btrdelta", "receive", "--")
    assert _complete("btrdelta", "send", "--no-d") == ["--no-data"]
    assert _complete("btrdelta", "receive", "-f", "tests/data/streams/dir-rotation-083.A.v1.s"
                     ) == ["tests/data/streams/dir-rotation-083.A.v1.stream"]


def test_zsh_completion_loads() -> None:
    subprocess.run(["zsh", "-n", str(ZSH)], check=True)
    out = subprocess.run(
        ["zsh", "-fc", f"fpath=({ZSH.parent} $fpath); autoload -U compinit; compinit -u -D; "
         "print -r -- ${_comps[btrdelta]}"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "_btrdelta"


def test_wheel_ships_and_installs_them(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("btrdelta-*.whl")
    with zipfile.ZipFile(wheel) as z:
        data = {n.split(".data/data/", 1)[1] for n in z.namelist() if ".data/data/" in n}
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "share").rglob("*") if p.is_file()}
    assert data == shipped
    # a fresh environment (pip with --prefix would uninstall the one running the tests)
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    # (without PYTHONPATH: with src on it, as the suite is often run, pip finds
    # src/btrdelta.egg-info, takes btrdelta for installed and installs nothing)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(prefix / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, env=env)
    found = subprocess.run(["man", "--manpath", str(prefix / "share" / "man"), "-w",
                            "btrdelta-send"], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(prefix / "share/man/man1/btrdelta-send.1")
    for rel in ("share/bash-completion/completions/btrdelta", "share/zsh/site-functions/_btrdelta"):
        assert (prefix / rel).read_bytes() == (ROOT / rel).read_bytes()
