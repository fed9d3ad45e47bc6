#!/usr/bin/env bash
# One device (one GPU, or the CPU): the smoke config by default, any config with --config.
#   launchers/smoke.sh [--config demo] [--output runs/smoke] [key=value ...]
set -euo pipefail
args=("$@")
case " $* " in *" --config "*) ;; *) args=(--config smoke "${args[@]}") ;; esac
case " $* " in *" --output "*) ;; *) args+=(--output "${OUTPUT:-runs/smoke}") ;; esac
# `kclip launch` passes SIGTERM / Ctrl-C to the rank (the bare deepspeed runner would leave it running, orphaned).
exec python -m kclip.cli launch deepspeed --num_gpus 1 --module kclip.cli train "${args[@]}"
