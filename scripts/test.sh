#!/usr/bin/env bash
# The test suite: set up the environment (first time), lint and format check, then pytest (no GPU, no network).
# Extra arguments go to pytest, e.g. -m slow, or -k storage.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ruff check alphaspin tasks flows tests bench
ruff format --check alphaspin tasks flows tests bench
exec python -m pytest "$@"
