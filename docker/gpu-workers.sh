#!/usr/bin/env bash
# One Prefect worker per GPU group, all in ONE pool (`gpu`; WORK_POOL=<name> for another): worker i
# owns its GPUs (CUDA_VISIBLE_DEVICES) and runs one flow run at a time (--limit 1), so concurrent flow
# runs never share a GPU. A single worker would start every flow run with all GPUs visible, and each
# would put its models on cuda:0. Then set the pool's and the `gpu` tag's limits to the number of workers
# (docs/gpu-pool.md, section 5).
#   - a process pool (docker/compose.yaml's `worker`, or a GPU host): each flow-run process inherits
#     its worker's CUDA_VISIBLE_DEVICES;
#   - a Docker pool made from deploy/docker-gpu-job-template.json: each worker hands its
#     CUDA_VISIBLE_DEVICES to its containers (ALPHASPIN_WORKER_GPUS; docker/gpu-entrypoint.sh).
#
#   GPU_COUNT=4 bash docker/gpu-workers.sh                      4 workers, GPUs 0, 1, 2, 3
#   GPU_COUNT=4 GPUS_PER_WORKER=2 bash docker/gpu-workers.sh    2 workers, GPUs 0,1 and 2,3 (tensor_parallel_size 2)
#   DRY_RUN=1 GPU_COUNT=2 bash docker/gpu-workers.sh            print the commands only
#
# Exits when any worker exits (the container's restart policy starts them all again); SIGTERM/SIGINT
# reach every worker.
set -euo pipefail
GPUS="${GPU_COUNT:-1}"
PER_WORKER="${GPUS_PER_WORKER:-1}"
POOL="${WORK_POOL:-gpu}"
PREFIX="${WORKER_NAME_PREFIX:-$(hostname)}"

for knob in GPU_COUNT GPUS_PER_WORKER; do
  value="$([ "$knob" = GPU_COUNT ] && echo "$GPUS" || echo "$PER_WORKER")"
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu-workers.sh: ${knob}=${value}: expected a whole number of GPUs, at least 1" >&2
    exit 2
  fi
done
if [ "$GPUS" -lt "$PER_WORKER" ] || [ $((GPUS % PER_WORKER)) -ne 0 ]; then
  echo "gpu-workers.sh: GPU_COUNT=${GPUS} is not a multiple of GPUS_PER_WORKER=${PER_WORKER}" >&2
  exit 2
fi

pids=()
stop() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2> /dev/null || true; done
}
trap stop TERM INT

for ((first = 0; first < GPUS; first += PER_WORKER)); do
  devices="$(seq -s, "$first" $((first + PER_WORKER - 1)))"
  name="${PREFIX}-gpu-${devices//,/-}"
  if [ -n "${DRY_RUN:-}" ]; then
    echo "CUDA_VISIBLE_DEVICES=${devices} prefect worker start --pool ${POOL} --limit 1 --name ${name}"
    continue
  fi
  CUDA_VISIBLE_DEVICES="$devices" prefect worker start --pool "$POOL" --limit 1 --name "$name" &
  pids+=("$!")
done
[ -n "${DRY_RUN:-}" ] && exit 0
status=0
wait -n "${pids[@]}" || status=$?
stop
wait || true
exit "$status"
