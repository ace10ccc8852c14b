#!/usr/bin/env bash
# No GPU: 2 gloo processes on this machine's CPU (NPROC=1 for a single plain process):
#   launch/cpu.sh [CONFIG.yaml] [key.sub=value ...]
set -euo pipefail
args=()
if [ $# -gt 0 ] && [[ "$1" == *.yaml || "$1" == *.yml ]]; then args=(--config "$1"); shift; fi
if [ "${NPROC:-2}" = 1 ]; then
  exec python -m distcls.train "${args[@]}" dist.device=cpu "$@"
fi
exec torchrun --standalone --nproc_per_node="${NPROC:-2}" -m distcls.train "${args[@]}" dist.device=cpu "$@"
