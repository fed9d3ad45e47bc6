"""The console shows kclip's lines, its progress bars and a summary; other libraries' output goes to RUN/log.txt (and
to the console with --verbose); errors stay one line."""
from __future__ import annotations

import io
import logging
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from shapes import make_shapes_mds
from test_train import REPO, _env, losses, train_cmd

from kclip import console
from kclip.data.sources import (
    count_folder_records,
    count_tar_records,
    folder_candidates,
    tar_candidates,
)

# A line from each library the demo's console used to fill; the resource tracker's come at interpreter exit.
NOISE = ("faiss.loader", "WARNING clustering", "DeepSpeed", "streaming.", "transformers", "resource_tracker",
         "leaked shared_memory")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=96)


def run(cmd: list[str], code: int = 0) -> tuple[str, str]:
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout, proc.stderr


def noise(text: str) -> list[str]:
    """Lines from other libraries; kclip's own lines may name them ("student and its DeepSpeed engine built")."""
    return [line for line in text.splitlines()
            if any(n in line for n in NOISE) and not re.match(r"\S+ \S+ kclip[.:]", line)]


@pytest.fixture(scope="module")
def quiet_run(shapes, tmp_path_factory) -> tuple[Path, str, str]:
    """A short run with validation and loader workers (streaming's shared memory in child processes)."""
    folder = tmp_path_factory.mktemp("console") / "run"
    out, err = run(train_cmd(folder, shapes, "train.steps=4", "log.every=2", f"data.val={shapes}",
                             "data.num_workers=2"))
    return folder, out, err


def test_the_console_holds_kclip_lines_and_the_log_file_the_rest(quiet_run):
    folder, out, err = quiet_run
    assert noise(out + err) == [], (out + err)[-4000:]
    log = (folder / "log.txt").read_text()
    for library in ("faiss.loader", "DeepSpeed", "streaming.base.dataset"):
        assert library in log, library


def test_the_run_ends_with_a_summary_whose_resume_command_resumes(quiet_run):
    folder, out, err = quiet_run
    summary = out[out.index("kclip train: done, 4 steps"):]
    assert "losses at step 4: total " in summary and "eval on data.val (96 pairs): i2t R@1/5/10" in summary
    assert f"checkpoint: {folder / 'checkpoints' / 'step_00000004'}" in summary
    assert f"{folder / 'log.txt'}" in summary
    resume = next(line for line in summary.splitlines() if "resume" in line).split(": ", 1)[1]
    assert resume.startswith("python -m kclip.cli train ") and " --resume latest " in resume
    # The printed command, with more steps and --verbose: it continues the run and shows the other libraries too.
    out, err = run([sys.executable, *shlex.split(resume)[1:], "train.steps=6", "--verbose"])
    assert max(losses(folder)) == 6
    assert "faiss.loader" in err and "streaming.base.dataset" in err
    assert "kclip train: done, 6 steps" in out


def test_errors_stay_one_line_and_quiet(quiet_run, shapes):
    folder, _, _ = quiet_run
    # Refused after the set-up, inside the logged part of the run: a resume with another config.
    out, err = run(train_cmd(folder, shapes, "train.steps=4", "loss.concept_weight=0.5", resume="latest"), code=1)
    errors = [line for line in err.splitlines() if line.startswith("kclip: error:")]
    assert len(errors) == 1 and "resuming with a changed config" in errors[0], err[-3000:]
    assert "Traceback" not in err and noise(out + err) == []


# A process that ends before unlinking a shared memory segment (killed, or cut short before streaming's atexit
# cleanup): the resource tracker unlinks it when the process is gone, and warns.
LEAK = ("import os, sys; from multiprocessing import shared_memory; from kclip import console; "
        "console.setup(verbose=sys.argv[1] == 'verbose'); shared_memory.SharedMemory(create=True, size=16); os._exit(0)")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_resource_trackers_exit_warnings_show_only_with_verbose(verbose):
    # Without the filter an in-process quiet command of this test session may have left in os.environ.
    env = {k: v for k, v in _env().items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", LEAK, "verbose" if verbose else "quiet"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and ("leaked shared_memory" in proc.stderr) == verbose, proc.stderr


def test_only_rank_0_prints_kclip_lines_and_every_rank_keeps_its_file(tmp_path, monkeypatch, capsys):
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        console.setup()
        with console.run_log(tmp_path):
            logging.getLogger("kclip.test").warning("kclip line of rank %s", rank)
            logging.getLogger("somelib").warning("library line of rank %s", rank)
            with console.printed_to_log("somelib"):
                print(f"printed line of rank {rank}")
    out, err = capsys.readouterr()
    assert "kclip line of rank 0" in err and "rank 1" not in err and "library line" not in err
    assert "printed line" not in out
    for name, rank in (("log.txt", "0"), ("log.rank1.txt", "1")):
        text = (tmp_path / name).read_text()
        assert all(f"{line} of rank {rank}" in text for line in ("kclip line", "library line", "printed line")), text


def test_conversion_totals_count_what_the_sources_yield(tmp_path):
    """`kclip prepare` counts its input first for the progress bar's ETA: the counts match the records."""
    src = tmp_path / "folder"
    src.mkdir()
    for name in ("a.png", "a.txt", "b.jpg", "b.txt", "c.txt", "d.json"):
        (src / name).write_bytes(b"x")
    assert count_folder_records(str(src)) == len(list(folder_candidates(str(src)))) == 3
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        for name in ("k1.jpg", "k1.txt", "k2.jpg", "k2.txt", "k2.json", "k3.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar")
    patterns = [str(tar), str(tmp_path / "broken.tar")]
    assert count_tar_records(patterns) == len(list(tar_candidates(patterns))) == 4


FAKE_LAUNCHER = """
import sys
print("[2026-12-02 14:11:49,181] [INFO] [launch.py:170:main] dist_world_size=2")
print("a rank's result line")
print("[2026-12-02 14:11:49,190] [ERROR] [launch.py:300:sigkill_handler] a rank exits with return code = 1")
print("[2026-12-02 14:11:49,200] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_kclip_launch_keeps_the_launchers_progress_lines_in_the_run_log(tmp_path, code):
    """DeepSpeed's runner and launch.py lines go to RUN/log.txt (and to stderr if the launch fails); its errors and
    whatever the ranks print pass through; --verbose passes everything."""
    (tmp_path / "run").mkdir()
    cmd = [sys.executable, "-m", "kclip.cli", "launch", sys.executable, "-c", FAKE_LAUNCHER, str(code),
           "--output", str(tmp_path / "run")]
    out, err = run(cmd, code)
    assert out.splitlines() == ["a rank's result line", "[2026-12-02 14:11:49,190] [ERROR] [launch.py:300:"
                                "sigkill_handler] a rank exits with return code = 1"]
    held = ["[2026-12-02 14:11:49,181] [INFO] [launch.py:170:main] dist_world_size=2",
            "[2026-12-02 14:11:49,200] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile"]
    assert (tmp_path / "run" / "log.txt").read_text().splitlines() == held
    assert [line for line in err.splitlines() if line in held] == (held if code else [])
    out, _ = run([*cmd, "--verbose"], code)
    assert len(out.splitlines()) == 4


# A Ctrl-C that lands while Python runs code compiled from a string (here an exec; in kclip's set-up, the dataclass
# and namedtuple definitions of the imports), caught as kclip's commands catch the second one.
INTERRUPTED_IN_EXEC = """
import os, signal, sys
from kclip import console
try:
    exec("os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(100): pass")
except KeyboardInterrupt:
    sys.exit(console.interrupted())
"""


def test_a_caught_interrupt_exits_130_under_python_m_not_by_sigint(tmp_path):
    (tmp_path / "interrupted_in_exec.py").write_text(INTERRUPTED_IN_EXEC)
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])  # -2 without console.interrupted's reset
