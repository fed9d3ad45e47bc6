"""A rank died: every rank's heartbeat in the rendezvous store, the watchdog that ends a survivor a dead peer left
waiting, and the one-line exit of a run whose collective failed because a peer died."""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import NoReturn

import torch.distributed as dist

from kclip.dist.group import remove_own_shm_buffer, rank, world_size


class Heartbeat:
    """Each rank bumps a counter in the rendezvous store (hosted by rank 0) every `interval` seconds from a daemon
    thread. When a collective fails, the survivors can then name the rank that died instead of printing a transport
    error: a lost rank's counter stops moving; an unreachable store means rank 0 itself is gone.

    The same thread is a watchdog: a survivor can also wait where no collective timeout reaches it, e.g. in
    streaming's shared-memory barrier between the local ranks at an epoch start, forever. When a peer's counter has not
    moved for `watch_s` (dist.timeout_s), the watchdog ends this process with one line, exit 1."""

    def __init__(self, watch_s: float, interval: float = 1.0):
        self.interval, self.watch_s = interval, watch_s
        self._store = self._connect()
        self._thread = threading.Thread(target=self._beat, name="kclip-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _connect() -> dist.TCPStore:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=10))

    def _beat(self) -> None:
        key, keys = f"kclip/heartbeat/{rank()}", [f"kclip/heartbeat/{r}" for r in range(world_size())]
        seen: dict[int, tuple[int, float]] = {}  # rank -> (its counter, when it last moved)
        last_reply = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                self._store.add(key, 1)
                counts = [int(self._store.add(k, 0)) for k in keys]
                last_reply = now
            except Exception:  # noqa: BLE001 - the store is gone with rank 0
                counts = None
            if counts is None:
                lost = [0] if now - last_reply > self.watch_s else []
            else:
                seen = {r: (c, now if seen.get(r, (None,))[0] != c else seen[r][1]) for r, c in enumerate(counts)}
                lost = [r for r, (_, moved) in seen.items() if r != rank() and now - moved > self.watch_s]
            if lost:
                _exit_lost(lost, self.watch_s)
            time.sleep(self.interval)

    def lost_ranks(self) -> list[int]:
        """Ranks whose heartbeat stopped (blocks ~3 intervals). [0] when the store on rank 0 cannot be reached."""
        try:
            store = self._connect()
            keys = [f"kclip/heartbeat/{r}" for r in range(world_size())]
            before = [int(store.add(k, 0)) for k in keys]
            time.sleep(3 * self.interval)
            after = [int(store.add(k, 0)) for k in keys]
        except Exception:  # noqa: BLE001
            return [0]
        return [r for r, (b, a) in enumerate(zip(before, after)) if a == b and r != rank()]


_heartbeat: Heartbeat | None = None


def start(timeout_s: float) -> None:
    """Start this rank's heartbeat and its watchdog on the others (init, on more than one rank)."""
    global _heartbeat
    # Heartbeats come a second apart: a watchdog tighter than ten of them would take jitter for a death.
    _heartbeat = Heartbeat(watch_s=max(timeout_s, 10.0))


def describe_failure(error: BaseException) -> str | None:
    """For an exception raised by a collective, one line naming the rank(s) that stopped responding; else None."""
    if _heartbeat is None or not isinstance(error, (dist.DistError, RuntimeError)):
        return None
    text = str(error)
    markers = ("gloo", "Gloo", "NCCL", "Connection", "connection", "timed out", "Timeout", "closed by peer")
    if not isinstance(error, dist.DistError) and not any(m in text for m in markers):
        return None
    lost = _heartbeat.lost_ranks()
    who = f"rank(s) {', '.join(map(str, lost))} stopped responding" if lost else "a peer rank failed"
    first_line = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    return f"rank {rank()}: a collective failed because {who} ({first_line}); resume with --resume latest"


def _exit_lost(lost: list[int], waited_s: float) -> None:
    """The watchdog's end of a run whose peer died: one line, this rank's shared-memory buffer removed, exit 1."""
    print(f"kclip: error: rank {rank()}: rank(s) {', '.join(map(str, lost))} stopped responding (no heartbeat for "
          f"{waited_s:g} s, dist.timeout_s); resume with --resume latest", file=sys.stderr, flush=True)
    # Of the atexit work that os._exit skips, only this rank's own: other libraries' exit handlers, run from this
    # thread while the main thread is still inside their code (a collective, a barrier), can abort the process.
    _leave(1)  # the main thread may be blocked where no exception can reach it


def exit_after_lost_peer(code: int = 1) -> NoReturn:
    """The main thread's end of a run whose collective failed because a peer died (its one line printed): without the
    interpreter's shutdown, whose destructors of a process group with a dead peer (gloo's pairs, their threads) can
    abort the survivor (exit -6, seen rarely in the dead-rank test). Log files are flushed first."""
    logging.shutdown()
    _leave(code)


def _leave(code: int) -> NoReturn:
    # streaming's shared memory is unlinked by multiprocessing's resource tracker once this process is gone.
    remove_own_shm_buffer()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
