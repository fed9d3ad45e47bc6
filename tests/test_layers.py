"""The package's layers only point down: import-linter's layers contract (.importlinter) on every module, lazy
imports included."""
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_module_imports_from_a_layer_above_it():
    proc = subprocess.run([shutil.which("lint-imports") or "lint-imports", "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
