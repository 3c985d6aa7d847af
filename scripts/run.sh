#!/usr/bin/env bash
# The main job: set up the environment (first time), then run α-SPIN with the default config
# (CPU, offline). Extra arguments go to `alphaspin run`, e.g. --set method.alpha=1.0
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec alphaspin run --config "${ALPHASPIN_CONFIG:-configs/quickstart.yaml}" "$@"
