"""Start-up: `kclip`, every command's --help and its argument errors answer without importing the libraries that take
seconds to import (torch ~1 s, transformers, deepspeed and mosaicml-streaming more); each command imports them once its
arguments are parsed."""
from __future__ import annotations

import subprocess
import sys
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
