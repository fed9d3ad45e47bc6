"""DeepSpeed JSON templates from `ds_configs/`, completed with the values the run derives.

The templates hold only choices a person makes (ZeRO stage, offload); everything derived from the run (batch sizes,
precision, hidden-size-based bucket sizes) is filled in here so it is never duplicated by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

# Editable installs and source checkouts find the top-level folder; wheels carry a copy inside the package.
_CANDIDATES = (Path(__file__).resolve().parent.parent / "ds_configs", Path(__file__).resolve().parent / "ds_configs")


def template_dir() -> Path:
    for path in _CANDIDATES:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"ds_configs/ not found in any of {[str(p) for p in _CANDIDATES]}")


def load_template(name: str) -> dict:
    """Read `ds_configs/<name>.json`."""
    path = template_dir() / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed template {name!r} not found: {path}")
    return json.loads(path.read_text())
