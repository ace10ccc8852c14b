#!/usr/bin/env bash
# One node, N processes (one per GPU; gloo on CPU when there is none):
#   launch/torchrun.sh configs/cifar10_resnet18.yaml [key.sub=value ...]
#   NPROC=4 MAX_RESTARTS=3 launch/torchrun.sh configs/X.yaml
# A crashed worker restarts all workers (up to MAX_RESTARTS); they resume from the newest
# checkpoint in run.out_dir on their own (TORCHELASTIC_RESTART_COUNT > 0).
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG.yaml [key.sub=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  -m distcls.train --config "$config" "$@"
