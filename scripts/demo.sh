#!/usr/bin/env bash
# `make demo` entry point: run the update story with the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py "$@"
