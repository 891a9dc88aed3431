"""The long targets of the Makefile (``make fuzz``, ``soak``, ``randwork``, ``fsstress``,
``matrix``; ``vmtest`` by its text): each says what it runs, runs pytest with ``CI=true``
(a test that cannot run here fails instead of passing as a skip), and removes its temporary
directory on success and on Ctrl-C, which exits 130 (128 + SIGINT, as the CLI), not 143 (SIGTERM's).

pytest itself is replaced by a script (``make BIN=...``): these tests check the recipes, not
the suites they run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = """#!/bin/sh
{{ echo "CI=$CI"; echo "ARGS=$*"; env | grep '^BTRDELTA_'; }} > {log}
case "$*" in
    *--basetemp=*) t=${{*##*--basetemp=}}; t=${{t%% *}}; echo "TMP=$(dirname $t)" >> {log};;
esac
touch {log}.ready
[ -e {log}.wait ] && exec sleep 60
[ -e {log}.fail ] && exit 3
exit 0
"""
TARGETS = {"fuzz": ("fuzz: 7 mutations per input and command", "BTRDELTA_MUTATIONS=7"),
           "soak": ("soak: 30 rounds of replication with cuts, seed 1", "BTRDELTA_SOAK=1"),
           "randwork": ("randwork: seeds 301-307", "BTRDELTA_RANDWORK=7"),
           "fsstress": ("fsstress: seeds 5-7, 300 operations each", "BTRDELTA_FSSTRESS_SEEDS=3"),
           "matrix": ("matrix: variants plain,lzo, scenarios all", "BTRDELTA_MATRIX=plain,lzo")}
ENV = {"BTRDELTA_MUTATIONS": "7", "BTRDELTA_RANDWORK": "7", "BTRDELTA_RANDWORK_FROM": "301",
       "BTRDELTA_FSSTRESS_SEEDS": "3", "BTRDELTA_FSSTRESS_FROM": "5",
       "BTRDELTA_FSSTRESS_OPS": "300",
       "BTRDELTA_MATRIX": "plain,lzo"}


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    (bin_ / "python").write_text(FAKE.format(log=log))
    (bin_ / "python").chmod(0o755)
    return bin_, log


def _make(target: str, bin_: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTRDELTA_") and k != "CI"}
    # SIGINT at its default: a suite started in the background inherits it ignored, and
    # so would make, which then never sees the test's Ctrl-C
    return subprocess.Popen(["make", "-s", "-C", str(ROOT), f"BIN={bin_}", target],
                            env={**env, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _field(log: Path, name: str) -> str:
    m = re.search(rf"^{name}=(.*)$", log.read_text(), re.M)
    assert m, log.read_text()
    return m[1]


@pytest.mark.parametrize("target", TARGETS)
def test_says_what_it_runs_with_ci_and_cleans_up(target: str, tmp_path: Path) -> None:
    bin_, log = _fake_bin(tmp_path)
    proc = _make(target, bin_)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    said, var = TARGETS[target]
    assert out.startswith(said), out
    assert re.search(r"; started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", out.splitlines()[0])
    assert _field(log, "CI") == "true"
    assert var in log.read_text()
    tmp = Path(_field(log, "TMP"))
    assert tmp.name.startswith(f"btrdelta-{target}."), tmp
    assert not tmp.exists()
    assert re.fullmatch(_removing(target, tmp), out.splitlines()[-1]), out


def _removing(target: str, tmp: Path) -> str:
    """The line the removal of the run's temporary directory says (scripts/cleanup.sh)."""
    return (rf"make {target}: removing the run's temporary files "
            rf"\([0-9.,]+[KMGT]?B in {re.escape(str(tmp))}\)")


def test_a_failed_run_keeps_pytests_exit_code_and_cleans_up(tmp_path: Path) -> None:
    """pytest's exit code (here 3) is the recipe's, after the removal that says so."""
    bin_, log = _fake_bin(tmp_path)
    Path(f"{log}.fail").touch()
    proc = _make("soak", bin_)
    out, _ = proc.communicate(timeout=120)
    tmp = Path(_field(log, "TMP"))
    assert proc.returncode == 2, out  # (make's, for a recipe that failed)
    assert re.search(r"\[Makefile:\d+: soak\] Error 3$", out, re.M), out
    assert re.search(_removing("soak", tmp), out), out
    assert not tmp.exists()


@pytest.mark.parametrize("target", TARGETS)
def test_ctrl_c_exits_130_and_cleans_up(target: str, tmp_path: Path) -> None:
    bin_, log = _fake_bin(tmp_path)
    Path(f"{log}.wait").touch()
    proc = _make(target, bin_)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{log}.ready").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tmp = Path(_field(log, "TMP"))
        assert tmp.is_dir()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # GNU make itself sometimes loses the race between its SIGINT handler and reaping the
    # recipe ("wait: No child processes. Stop.", seen once in session 14's CI): then make,
    # not the recipe, chose the exit code, and the recipe must still have cleaned up
    assert re.search(_removing(target, tmp), out), out
    assert (re.search(rf"\[Makefile:\d+: {target}\] Error 130", out)
            or (re.search(r"\*\*\* wait: No child processes\.\s+Stop\.", out)
                and proc.returncode != 0)), out
    assert not tmp.exists()


def test_vmtest_says_what_it_runs_with_ci() -> None:
    text = subprocess.run(["make", "-n", "-C", str(ROOT), "vmtest"], capture_output=True,
                          text=True, check=True).stdout
    assert 'echo "vmtest: ' in text
    # through scripts/longrun.sh, as the targets above (CI=true, Ctrl-C exits 130): not run
    # here, its sysdeps may install qemu
    assert re.search(r"^exec env BIN=\S+ BTRDELTA_VMTEST=1 scripts/longrun.sh vmtest -s",
                     text, re.M), text
