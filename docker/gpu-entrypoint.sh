#!/usr/bin/env bash
# The GPU image's entrypoint (under tini): runs its command with the GPUs of the worker that started the
# container. A Docker worker of the `gpu` pool started with CUDA_VISIBLE_DEVICES (docker/gpu-workers.sh: one
# worker per GPU, all in ONE pool) passes it to each flow-run container as ALPHASPIN_WORKER_GPUS (the
# default `env` of deploy/docker-gpu-job-template.json, resolved by the worker from its own environment);
# here it becomes the container's CUDA_VISIBLE_DEVICES, so concurrent containers never share a GPU.
# The container must hold those GPUs: the template's gpu_count -1 (its default) gives it every GPU of the host.
#
#   ALPHASPIN_WORKER_GPUS=1 docker/gpu-entrypoint.sh python -c 'import os; print(os.environ["CUDA_VISIBLE_DEVICES"])'
#
# Unset or empty (a worker that owns no GPU, the compose worker, a plain `docker run`): the command runs as is.
# A CUDA_VISIBLE_DEVICES the run set itself (job variable env) wins. Refused in one line, exit 2, before the
# command starts: ids that are not GPU indexes or UUIDs, and an index the container does not have (nvidia-smi).
set -euo pipefail
me="gpu-entrypoint.sh"
gpus="${ALPHASPIN_WORKER_GPUS:-}"
if [ -n "$gpus" ] && [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then
  IFS=, read -r -a ids <<< "$gpus"
  have=""
  if command -v nvidia-smi > /dev/null 2>&1; then
    have="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)"
  fi
  for id in "${ids[@]}"; do
    if ! [[ "$id" =~ ^([0-9]+|(GPU|MIG)-[0-9A-Za-z/-]+)$ ]]; then
      echo "$me: ALPHASPIN_WORKER_GPUS=$gpus (the worker's CUDA_VISIBLE_DEVICES): '$id' is not a GPU index or UUID" >&2
      exit 2
    fi
    if [[ "$id" =~ ^[0-9]+$ ]] && [ -n "$have" ] && [ "$id" -ge "$have" ]; then
      echo "$me: the worker owns GPU $id (ALPHASPIN_WORKER_GPUS=$gpus) but this container was given $have GPU(s):" \
        "set the job variable gpu_count to -1 (every GPU of the host) on a pool of GPU-owning workers" >&2
      exit 2
    fi
  done
  export CUDA_VISIBLE_DEVICES="$gpus"
fi
exec "$@"
