#!/usr/bin/env bash
# Install kclip with its test extras, fetch the small real teacher, run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e ".[test]"
# DeepSpeed JIT-compiles a CPU communication op on first use: keep it between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kclip/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
python -m kclip.cli fetch-teacher --out teachers
python -m pytest "$@"
