"""Stopping on a signal without a hang and without losing a step.

SIGTERM, SIGUSR1 (SLURM's --signal, a scheduler's preemption notice) and a first SIGINT (Ctrl-C) only set a flag: the
ranks agree on it at the next step boundary, checkpoint together and exit 0, leaving `RUN/PREEMPTED` for the SLURM
script to requeue. Acting inside the handler could leave ranks in different collectives, which is how preemption
turns into a hang. A second SIGINT aborts at once (KeyboardInterrupt), for a user who does not want to wait.

A rank whose launcher has gone (a SIGTERM to the plain `deepspeed` runner, which ends it alone, or any launcher
killed) raises the same flag as a SIGTERM (kclip.train.launcher_watch), whichever launcher started it.

`install()` runs first thing in `kclip train`, before the heavy imports and the set-up (teacher load, engines,
loader), so a signal that arrives during set-up is not lost either: the run then stops right after set-up.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from kclip.train import launcher_watch

log = logging.getLogger("kclip.train")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: list[int] = []


def _handle(signum, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # the second Ctrl-C
    _received.append(signum)


def install() -> None:
    """Route the stop signals to the flag (main thread only: Python delivers signals there), and the end of the
    launcher that started this process too."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handle)
    launcher_watch.start(on_gone=lambda: _received.append(signal.SIGTERM))


class StopSignal:
    """The run's view of the flag. `RUN/PREEMPTED` is removed when a run starts and written when a signal stopped it."""

    def __init__(self, run_dir: Path):
        from kclip import dist

        install()  # idempotent; for callers of train() that are not `kclip train` (tests, notebooks)
        self.marker = run_dir / "PREEMPTED"
        if dist.is_main():
            self.marker.unlink(missing_ok=True)

    @property
    def received(self) -> int | None:
        return _received[0] if _received else None

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank got a signal."""
        from kclip import dist

        return dist.all_reduce_max(int(self.received is not None)) > 0

    def mark_preempted(self, step: int, *, during_setup: bool = False) -> None:
        from kclip import dist

        if dist.is_main():
            self.marker.write_text(f"step={step}\n")
            if during_setup:
                log.warning("stop signal received during set-up: exiting before training step %d (nothing new to "
                            "save); continue with --resume auto", step + 1)
            else:
                log.warning("stop signal received: checkpointed step %d; resume with --resume latest", step)
