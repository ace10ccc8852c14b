#!/usr/bin/env bash
# Single-GPU (or CPU) debugging: one process, num_workers 0, a few steps per epoch, anomaly
# detection, deterministic algorithms, full tracebacks:
#   launch/debug.sh configs/X.yaml [key.sub=value ...]
set -euo pipefail
config=${1:?usage: launch/debug.sh CONFIG.yaml [key.sub=value ...]}
shift
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
exec python -m distcls.train --debug --config "$config" "$@"
