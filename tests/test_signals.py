"""Stop signals reach the ranks however the run was launched, at any point of it: `kclip launch` forwards them to the
ranks, ranks whose bare deepspeed runner was terminated (it orphans them) notice it and stop alike, a signal during
set-up stops the run cleanly after set-up, a first Ctrl-C checkpoints like SIGTERM and a second one aborts in one
line."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from shapes import make_shapes_mds
from test_train import REPO, _env, losses, wait_for

from kclip.dist import free_port

LONG_RUN = ["train.steps=400", "log.every=1", "checkpoint.every=1000", "dist.timeout_s=60"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=96)


def kclip_train(run: Path, data: Path, *overrides: str) -> list[str]:
    return ["train", "--config", "smoke", "--output", str(run), f"data.train={data}", *LONG_RUN, *overrides]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def processes_of(run: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(run) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


def assert_preempted_with_checkpoint(run: Path, proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    step = int((run / "PREEMPTED").read_text().strip().split("=")[1])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}" and step < 400
    assert processes_of(run) == []  # no orphan: every rank and the launcher are gone


@pytest.mark.slow
def test_sigterm_to_kclip_launch_reaches_both_ranks_of_a_deepspeed_launch(shapes, tmp_path):
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "kclip.cli", "launch", "deepspeed", "--num_gpus", "2", "--master_port",
                  str(free_port()), "--module", "kclip.cli", *kclip_train(run, shapes)])
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(losses(run)) >= 2, proc)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert_preempted_with_checkpoint(run, proc)
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_sigterm_to_the_plain_deepspeed_runner_stops_both_ranks_cleanly(shapes, tmp_path):
    run = tmp_path / "run"
    runner = start(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "kclip.cli",
                    *kclip_train(run, shapes)])
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and len(losses(run)) >= 2, runner)
        runner.send_signal(signal.SIGTERM)  # the runner alone, as `kill PID` or a scheduler does
        # EOF on the runner's pipes, which launch.py and the ranks inherited, once every one of them has ended.
        out, err = runner.communicate(timeout=60)
    finally:
        for orphan in processes_of(run):  # left training when the watch failed: not for the next tests' cores
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()
    assert runner.returncode == -signal.SIGTERM  # DeepSpeed's runner ends on the signal at once
    # launch.py, orphaned, logs each rank's exit 0 (then exits 0 itself) to the stdout it inherited.
    assert out.count("exits successfully") == 2 and "kclip: error" not in err, out[-3000:] + err[-3000:]
    step = int((run / "PREEMPTED").read_text().strip().split("=")[1])
    assert 0 < step < 400 and (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    # Logged by whichever rank noticed first (rank 0's console says only that it stopped on a signal).
    noticed = f"the launcher that started this rank is gone (pid {runner.pid}: "
    assert any(noticed in log.read_text() for log in run.glob("log*.txt"))


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_and_the_second_aborts_in_one_line(shapes, tmp_path):
    run = tmp_path / "once"
    proc = start([sys.executable, "-m", "kclip.cli", *kclip_train(run, shapes)])
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(losses(run)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    assert_preempted_with_checkpoint(run, proc)

    run = tmp_path / "twice"
    proc = start([sys.executable, "-m", "kclip.cli", *kclip_train(run, shapes)])
    # Two signals sent back to back can merge into one delivery; and the smoke steps are too short to reliably land
    # a second one before the first has stopped the run. The set-up (engines, loader) lasts seconds: interrupt it.
    wait_for(lambda: (run / "run.lock").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("kclip: error:")]
    assert proc.returncode == 130 and len(errors) == 1 and "second interrupt" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_sigterm_during_set_up_exits_cleanly_and_the_requeue_trains(shapes, tmp_path):
    run = tmp_path / "setup"
    proc = start([sys.executable, "-m", "kclip.cli", *kclip_train(run, shapes)])
    wait_for(lambda: (run / "run.lock").is_file(), proc)  # the process group exists; the set-up has begun
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "during set-up" in err and (run / "PREEMPTED").read_text() == "step=0\n"
    assert not (run / "checkpoints" / "latest").exists() and not (run / "run.lock").exists()
    requeued = subprocess.run([sys.executable, "-m", "kclip.cli", *kclip_train(run, shapes, "train.steps=2"),
                               "--resume", "auto"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert max(losses(run)) == 2
