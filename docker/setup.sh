#!/usr/bin/env bash
# One-shot setup of the alphaspin stack (docker/compose.yaml's `setup` service; also usable on any
# machine whose PREFECT_API_URL and AWS_* variables point at the stack): the bucket, the work pools,
# the GPU limits, a result-storage block next to the runs, the zombie-flow automation and the
# deployments. Idempotent.
set -euo pipefail
cd "${ALPHASPIN_HOME:-$(dirname "$0")/..}"
BUCKET="${ALPHASPIN_BUCKET:-alphaspin}"
# One flow run per worker of docker/gpu-workers.sh: GPU_COUNT / GPUS_PER_WORKER at once.
GPUS="$(( ${GPU_COUNT:-1} / ${GPUS_PER_WORKER:-1} ))"

echo "[setup] bucket s3://${BUCKET}"
python - "$BUCKET" <<'EOF'
import sys
import time

import s3fs

bucket = sys.argv[1]
fs = s3fs.S3FileSystem(config_kwargs={"s3": {"addressing_style": "path"}}, skip_instance_cache=True)
for attempt in range(60):  # the S3 gateway may still be starting
    try:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        break
    except Exception as error:  # noqa: BLE001 - retried, then raised
        if attempt == 59:
            raise
        print(f"[setup] S3 not ready ({error}); retrying", flush=True)
        time.sleep(2)
EOF

echo "[setup] work pools cpu and gpu (${GPUS} GPU slot(s)), tag limit gpu=${GPUS}"
prefect work-pool inspect cpu > /dev/null 2>&1 || prefect work-pool create cpu --type process
prefect work-pool inspect gpu > /dev/null 2>&1 || prefect work-pool create gpu --type process
prefect work-pool set-concurrency-limit gpu "${GPUS}"
prefect concurrency-limit create gpu "${GPUS}"

echo "[setup] result storage block remote-file-system/alphaspin-results -> s3://${BUCKET}/_prefect"
python -c "from prefect.filesystems import RemoteFileSystem; RemoteFileSystem(basepath='s3://${BUCKET}/_prefect').save('alphaspin-results', overwrite=True)"

echo "[setup] automation: flow runs that stop heartbeating (dead worker or node) are marked Crashed"
python -m alphaspin.flows.orchestration

echo "[setup] deployments"
prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml
