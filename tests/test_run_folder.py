"""A run folder belongs to one run: a fresh start into a folder with checkpoints is refused (before any process
group), a second run on a live folder is refused naming the holder, and stale locks of dead runs are taken over."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shapes import make_shapes_mds
from test_train import REPO, _env, train_cmd

from kclip.cli import main
from kclip.train import run_folder
from kclip.train.run_folder import (
    LOCK,
    RunFolderError,
    RunLock,
    check_fresh_start,
    clear,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=96)


def fake_run(run: Path) -> Path:
    """A folder as an earlier run leaves it: two complete checkpoints, `latest`, config, logs."""
    for step in (10, 20):
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text("world_size=1\n")
    (run / "checkpoints" / "latest").write_text("step_00000020")
    (run / "config.yaml").write_text("old: config\n")
    (run / "metrics.jsonl").write_text('{"step": 20}\n')
    (run / "log.txt").write_text("rank 0's log\n")
    (run / "log.rank1.txt").write_text("rank 1's log\n")
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_train_into_a_run_is_refused_before_any_process_group(shapes, tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    before = snapshot(run)
    assert main(["train", "--config", "smoke", "--output", str(run), f"data.train={shapes}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already holds a run (checkpoints up to step_00000020)" in error[0], error
    assert "--resume latest" in error[0] and "--overwrite" in error[0]
    assert snapshot(run) == before  # nothing written, nothing pruned
    check_fresh_start(run, "latest", overwrite=False)  # resuming it is what the folder is for
    check_fresh_start(run, None, overwrite=True)


def test_overwrite_clears_only_the_old_runs_files(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    clear(run)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    check_fresh_start(run, None, overwrite=False)


def test_a_live_lock_refuses_a_second_run_and_names_its_holder(tmp_path):
    with RunLock(tmp_path) as first:
        first.acquire()
        with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()  # released with the run


def _write_lock(folder: Path, **holder) -> Path:
    path = folder / LOCK
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": None, "started": "then", **holder}))
    return path


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    # Same host, process gone (a SIGKILLed run).
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid)
    with RunLock(tmp_path) as lock:
        lock.acquire()
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    # Another host whose holder stopped refreshing the lock.
    path = _write_lock(tmp_path)
    old = time.time() - run_folder.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    with RunLock(tmp_path) as lock:
        lock.acquire()
    # The same SLURM job, requeued: its previous incarnation has ended.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, slurm_job_id="4242")
    with RunLock(tmp_path) as lock:
        lock.acquire()
    # Another host, lock fresh: alive as far as anyone can tell.
    _write_lock(tmp_path)
    with pytest.raises(RunFolderError, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()


def test_a_second_training_on_a_live_folder_is_refused_in_one_line(shapes, tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as lock:
        lock.acquire()  # this test process stands for a training that is running
        proc = subprocess.run(train_cmd(run, shapes, "train.steps=2"), env=_env(), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and f"in use by pid {os.getpid()}" in errors[0], proc.stderr[-2000:]
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


def _read_only(monkeypatch, folder: Path) -> None:
    """Writes under `folder` fail with EROFS, as on a read-only mount (root ignores chmod, so a chmod proves nothing)."""
    import errno
    import tempfile

    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)


def test_a_read_only_output_or_data_folder_is_one_line_before_any_process_group(shapes, tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _read_only(monkeypatch, read_only)
    assert main(["train", "--config", "smoke", "--output", str(read_only / "run"), f"data.train={shapes}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"kclip: error: --output: {read_only / 'run'} is not writable (Read-only file system)"], error
    # kclip's datasets are .zstd shards: streaming writes the decompressed shards into the dataset folder
    data = read_only / "data"
    shutil.copytree(shapes, data)
    for raw in data.glob("*.mds"):
        raw.unlink()  # as `kclip prepare` leaves them: compressed only
    assert main(["train", "--config", "smoke", "--output", str(tmp_path / "run"), f"data.train={data}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"data.train: {data} holds compressed shards" in error[0], error
    assert "not writable (Read-only file system)" in error[0]
