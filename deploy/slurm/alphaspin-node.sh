#!/bin/bash
# One node's part of deploy/slurm/alphaspin-run.sbatch: with several nodes `srun` runs it once per node,
# with one the batch script runs it. It reads Slurm's environment and runs
#   node 0 (SLURM_NODEID 0, the first of SLURM_JOB_NODELIST):  alphaspin run ARGS
#   node R (R >= 1):  python -m alphaspin.distributed follow ARGS --machine-rank R   (joins every train stage)
# adding, with SLURM_NNODES = N > 1, --set training.num_machines=N --set training.main_process_ip=<first node>
# (last, so Slurm's allocation wins over a recipe's fixed address), and --no-prefect to node 0 unless
# PREFECT_API_URL is set. ALPHASPIN (default: `alphaspin` on PATH) names the command; the follower runs the
# Python beside it. ALPHASPIN_SLURM_DRY_RUN=1 prints the command instead of running it.
set -uo pipefail
me="alphaspin-node.sh"
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "$me: SLURM_JOB_ID is not set: this runs inside a Slurm job (sbatch deploy/slurm/alphaspin-run.sbatch ...)" >&2
  exit 2
fi
alphaspin="${ALPHASPIN:-$(command -v alphaspin || true)}"
if [ -z "$alphaspin" ] || [ ! -x "$alphaspin" ]; then
  echo "$me: no alphaspin command on $(hostname): activate alphaspin's environment before sbatch, or set ALPHASPIN=/path/to/bin/alphaspin" >&2
  exit 2
fi
nodes="${SLURM_NNODES:-1}"
rank="${SLURM_NODEID:-0}"
if ! [[ "$nodes" =~ ^[0-9]+$ && "$rank" =~ ^[0-9]+$ ]] || [ "$rank" -ge "$nodes" ]; then
  echo "$me: SLURM_NODEID=$rank and SLURM_NNODES=$nodes: expected 0 <= SLURM_NODEID < SLURM_NNODES" >&2
  exit 2
fi
extra=()
if [ "$nodes" -gt 1 ]; then
  list="${SLURM_JOB_NODELIST:-}"
  if [ -z "$list" ]; then
    echo "$me: SLURM_JOB_NODELIST is not set: several nodes need it for the rendezvous address" >&2
    exit 2
  fi
  if [[ "$list" == *"["* ]]; then  # a Slurm host list such as gpu[01-04]: Slurm expands it
    if ! command -v scontrol >/dev/null; then
      echo "$me: scontrol not found: it expands SLURM_JOB_NODELIST=$list" >&2
      exit 2
    fi
    mapfile -t hosts < <(scontrol show hostnames "$list")
  else
    IFS=, read -r -a hosts <<< "$list"
  fi
  if [ "${#hosts[@]}" -ne "$nodes" ]; then
    echo "$me: SLURM_JOB_NODELIST=$list names ${#hosts[@]} node(s) but SLURM_NNODES=$nodes" >&2
    exit 2
  fi
  extra=(--set "training.num_machines=$nodes" --set "training.main_process_ip=${hosts[0]}")
fi
if [ "$rank" = 0 ]; then
  command=("$alphaspin" run "$@" "${extra[@]}")
  [ -z "${PREFECT_API_URL:-}" ] && command+=(--no-prefect)
else
  command=("$(dirname "$alphaspin")/python" -m alphaspin.distributed follow "$@" "${extra[@]}" --machine-rank "$rank")
fi
if [ -n "${ALPHASPIN_SLURM_DRY_RUN:-}" ]; then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
exec "${command[@]}"
