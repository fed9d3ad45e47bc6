#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher over pdsh/ssh.
#   HOSTFILE=hosts launchers/train.sh --config cc3m-llama2-7b-vitb16 --output runs/kclip [key=value ...]
# HOSTFILE lines look like `node01 slots=8`. pdsh forwards only a few variable prefixes to remote ranks, so the
# variables the run needs are written to .deepspeed_env (read from the launch directory) first.
set -euo pipefail
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
if [ ! -f "$HOSTFILE" ]; then
  echo "launchers/train.sh: hostfile '$HOSTFILE' not found (lines like 'node01 slots=8'); set HOSTFILE" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
{
  for var in PATH PYTHONPATH LD_LIBRARY_PATH HF_HOME TORCH_EXTENSIONS_DIR NCCL_DEBUG NCCL_SOCKET_IFNAME \
             NCCL_IB_HCA CUDA_HOME WANDB_API_KEY WANDB_MODE; do
    if [ -n "${!var:-}" ]; then echo "$var=${!var}"; fi
  done
} > .deepspeed_env
# Under pdsh no rank is a child of this node's launcher: `kclip launch` hands signals to the runner, which forwards
# them over pdsh (launch.py on each node then SIGTERMs its ranks, SIGKILLing them 30 s later).
exec python -m kclip.cli launch deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module kclip.cli train "$@"
