"""A run folder belongs to one run.

- A fresh `train` into a folder that holds checkpoints is refused before any process group starts, unless it resumes
  (`--resume`) or says `--overwrite`: otherwise its saves and pruning would interleave with the old run's, leaving
  `latest` pointing at a checkpoint the other run pruned.
- While a run lives, rank 0 holds `RUN/run.lock` (host, pid, SLURM job id) and refreshes its mtime every
  `REFRESH_S`. A second run on the folder is refused with one line naming the holder. A lock is stale, and taken
  over, when its process is gone: on the same host its pid no longer exists; from another host its mtime stopped
  moving for `STALE_AFTER_S`; under the same SLURM job id it is this job's previous incarnation (SLURM requeues only
  after a job ended). A SIGKILL therefore never locks a folder for good.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from kclip import dist
from kclip.train import checkpoint

log = logging.getLogger("kclip.train")

LOCK = "run.lock"
REFRESH_S = 30.0
STALE_AFTER_S = 4 * REFRESH_S


class RunFolderError(RuntimeError):
    pass


def check_fresh_start(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a start from scratch into a folder whose checkpoints belong to an earlier run (no process group)."""
    if resume is not None or overwrite:
        return
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    if done:
        raise RunFolderError(f"--output {run_dir} already holds a run (checkpoints up to {done[-1].name}): continue "
                             "it with --resume latest, or start over with --overwrite (deletes its checkpoints and logs)")


def clear(run_dir: Path) -> None:
    """`--overwrite`: remove the previous run's checkpoints, logs and markers (called under the lock)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    for path in [run_dir / "metrics.jsonl", run_dir / "PREEMPTED", *run_dir.glob("log*.txt")]:
        path.unlink(missing_ok=True)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _is_stale(path: Path, holder: dict) -> bool:
    me = _holder()
    if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"]:
        return True
    if holder.get("host") == me["host"]:
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError):
            return False
        return False
    return time.time() - path.stat().st_mtime > STALE_AFTER_S


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunFolderError naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            break
        self._thread = threading.Thread(target=self._refresh, name="kclip-run-lock", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile: try again
        except ValueError:
            holder = {}  # being written, or truncated by a crash: judged by its mtime below
        if not _is_stale(self.path, holder):
            raise RunFolderError(
                f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                f"{holder.get('started', '?')} ({self.path}); use another --output, or wait for that run to end")
        log.warning("taking over the stale lock %s of %s", self.path, holder)
        # A rename has one winner when two starters find the same stale lock; the loser retries and sees the new one.
        try:
            os.rename(self.path, self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
            self.path.with_name(f"{LOCK}.stale-{os.getpid()}").unlink()
        except FileNotFoundError:
            pass

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def claim(run_dir: Path, overwrite: bool) -> RunLock:
    """Collective: rank 0 takes the folder's lock (and with `overwrite` clears the old run under it); every rank
    raises the same RunFolderError when it cannot. Use as a context manager: the lock goes with the run."""
    lock, error = RunLock(run_dir), None
    if dist.is_main():
        try:
            lock.acquire()
            if overwrite:
                clear(run_dir)
        except (RunFolderError, OSError) as e:
            lock.release()
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise RunFolderError(error)
    return lock
