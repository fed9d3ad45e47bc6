"""Which ancestors count as launchers, and that a launcher's end reaches the watch within its poll."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_train import REPO, _env

from kclip.train import launcher_watch

PY = "/usr/bin/python3.11"


@pytest.mark.parametrize("cmdline", [
    [PY, "/venv/bin/deepspeed", "--num_gpus", "2", "--module", "kclip.cli", "train"],
    [PY, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--module", "kclip.cli", "train"],
    [PY, "/venv/bin/torchrun", "--nproc-per-node", "2", "-m", "kclip.cli", "train"],
    [PY, "-X", "faulthandler", "-m", "torch.distributed.run", "train.py"],
    [PY, "/venv/bin/kclip", "launch", "deepspeed", "--num_gpus", "2"],
    [PY, "-m", "kclip.cli", "launch", "torchrun"],
])
def test_launchers_are_recognised(cmdline):
    assert launcher_watch.is_launcher(cmdline)


@pytest.mark.parametrize("cmdline", [
    ["/bin/bash", "launchers/train.sh"],
    [PY, "-m", "pytest", "tests"],
    [PY, "-u", "-m", "kclip.cli", "--local_rank=0", "train", "--config", "smoke"],  # a rank: not a rank's launcher
    [PY, "/venv/bin/kclip", "train", "--config", "launch"],
    ["slurmstepd: [1234.0]"],  # srun's tasks: slurmstepd outlives them and signals them itself
    ["/sbin/init"],
])
def test_shells_pytest_ranks_and_slurm_are_not_launchers(cmdline):
    assert not launcher_watch.is_launcher(cmdline)


def test_a_process_started_from_pytest_watches_nothing():
    assert launcher_watch.launcher_chain(psutil.Process().parents()) == []


# A rank under a fake `torchrun` (by its file name, as an entry point runs): the rank prints once it watches, and how
# its watch ended.
WATCHED = """
import threading
from kclip.train import launcher_watch
gone = threading.Event()
launcher_watch.start(on_gone=gone.set)
print("watching", flush=True)
print("launcher gone" if gone.wait(30) else "still watching", flush=True)
"""


def test_a_killed_launcher_is_noticed_even_as_an_unreaped_zombie(tmp_path):
    fake = tmp_path / "torchrun"
    fake.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {WATCHED!r}])\n")
    launcher = subprocess.Popen([sys.executable, str(fake)], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert launcher.stdout.readline() == "watching\n"
    os.kill(launcher.pid, signal.SIGKILL)
    started = time.monotonic()
    # communicate() reaps the launcher only after EOF, i.e. once the rank (holding the same pipes) has ended: until
    # then the launcher is a zombie, which is still "running" to psutil.
    out, err = launcher.communicate(timeout=30)
    assert out == "launcher gone\n" and time.monotonic() - started < 5, err
    assert f"the launcher that started this rank is gone (pid {launcher.pid}: " in err
