"""The package's layers only point down: import-linter's layers contract (.importlinter) on every module, lazy
imports included."""
import configparser
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_module_imports_from_a_layer_above_it():
    proc = subprocess.run([shutil.which("lint-imports") or "lint-imports", "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_only_exemption_is_the_public_entry_point():
    """An upward import must be moved, not exempted: `kclip.load` (kclip/__init__.py, imported on demand) is the
    package's front door and may reach the top."""
    contract = configparser.ConfigParser()
    contract.read(REPO / ".importlinter")
    ignored = [line.strip() for line in contract["importlinter:contract:layers"]["ignore_imports"].splitlines()
               if line.strip() and not line.strip().startswith("#")]
    assert ignored == ["kclip -> kclip.export.load"]
