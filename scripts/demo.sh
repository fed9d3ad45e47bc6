#!/usr/bin/env bash
# The embedded default, end to end on a CPU or one GPU: install, build the Twemoji demo data, fetch the
# SmolLM2-135M teacher, train Knowledge-CLIP, evaluate on the held-out split and print the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e .
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kclip/torch_extensions}
# test/stats.json is written last; a data/demo without it was built by an older kclip (no test split, or written in
# place): it is derived from pip packages only, so it is rebuilt
if [ ! -f data/demo/test/stats.json ]; then
    [ -e data/demo ] && echo "data/demo predates the demo's test split: rebuilding it" && rm -rf data/demo
    python -m kclip.cli prepare demo --out data/demo
fi
python -m kclip.cli fetch-teacher --out teachers
RUN=${RUN:-runs/demo}
# --resume auto: a re-run continues an interrupted run, or re-evaluates a finished one (RUN=runs/other starts anew)
python -m kclip.cli train --config demo --output "$RUN" --resume auto "$@"
