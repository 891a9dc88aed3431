#!/bin/sh
# A long test target of the Makefile (soak, randwork, matrix, fuzz): BIN/python -m pytest
# with CI=true (a test that cannot run fails instead of passing as a skip), its --basetemp
# in a temporary directory removed whatever ends the run; Ctrl-C, SIGTERM and SIGHUP exit
# 130, 143 and 129 (128 + the signal, as the CLI does).
# Usage: BIN=.venv/bin scripts/longrun.sh NAME PYTEST-ARGUMENTS...
name=$1
shift
tmp=$(mktemp -d "/tmp/btrdelta-$name.XXXXXX") || exit 1
trap '"$(dirname "$0")/cleanup.sh" "make $name" "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
CI=true "$BIN/python" -m pytest -q -p no:cacheprovider --basetemp="$tmp/t" "$@"
