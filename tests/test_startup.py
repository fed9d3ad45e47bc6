"""Start-up: `kclip`, every command's --help and its argument errors answer without importing the libraries that take
seconds to import (torch ~1 s, transformers, deepspeed and mosaicml-streaming more; each command imports them once its
arguments are parsed), and `kclip train` logs where its start-up time goes."""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kclip.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "streaming", "deepspeed", "transformers", "faiss")
# An unknown option is an argument error for every command but `launch`, which runs whatever follows it.
BAD_ARGS = {"launch": []}


def heavy_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python -X importtime -m kclip.cli ARGS`; also return one line per heavy library it imported, naming the
    chain of modules that imported it (e.g. `torch <- kclip.data.transforms <- kclip.data.prepare`)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kclip.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    # Lines "import time: self | cumulative | <2 spaces per level>name", each module after the ones it imported.
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            field = line.split("|")[2]
            name = field.strip()
            rows.append(((len(field) - len(field.lstrip())) // 2, name))
    found = []
    for i, (depth, name) in enumerate(rows):
        if name in HEAVY:
            chain, level = [name], depth
            for parent_depth, parent in rows[i + 1:]:
                if parent_depth < level:
                    chain.append(parent)
                    level = parent_depth
            found.append(" <- ".join(chain))
    return proc, found


def test_kclip_without_a_command_prints_usage_without_heavy_imports():
    proc, found = heavy_imports()
    assert proc.returncode == 2 and "usage: kclip" in proc.stderr
    assert found == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_imports_no_heavy_library(command):
    proc, found = heavy_imports(command, "--help")
    assert "usage: kclip" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert found == [], f"`kclip {command} --help` imported: " + "; ".join(found)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_argument_error_imports_no_heavy_library(command):
    proc, found = heavy_imports(command, *BAD_ARGS.get(command, ["--no-such-option"]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert found == [], f"`kclip {command}` with bad arguments imported: " + "; ".join(found)


def test_trainer_logs_every_start_up_phase_the_benchmark_reads(tmp_path):
    """benchmarks/startup.py splits a run into phases from the trainer's own `start-up` lines: a one-step smoke run
    logs all of them, and the phases add up to the time to the first step."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import startup
    from shapes import make_shapes_mds
    from test_train import _env

    from kclip.train.metrics import read_metrics

    data, run = make_shapes_mds(tmp_path / "shapes", n=32), tmp_path / "run"
    cmd = [sys.executable, "-m", "kclip.cli", "train", "--config", "smoke", "--output", str(run), f"data.train={data}",
           *startup.OVERRIDES]
    launched = time.time()
    # _env(): without the launcher variables an in-process command earlier in the session left in os.environ (a
    # MASTER_PORT picked then may be taken now).
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    total = time.time() - launched
    assert proc.returncode == 0, proc.stderr[-3000:]
    step1 = next(row for row in read_metrics(run) if row.get("step") == 1 and "data_ms" in row)
    phases = startup.phases(proc.stderr, step1, step1["time"] - launched, total)
    assert all(math.isfinite(v) and v >= 0 for v in phases.values()), phases
    assert phases["other"] < 0.5 * phases["to first step"], phases
