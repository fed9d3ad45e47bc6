"""The default process group: its start (init, and the start-up lines of log_startup), this rank's place in it and
on its node, its node's group. A rank on DeepSpeed's CPU accelerator removes its own /dev/shm allreduce buffer as it
exits."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import time

import torch
import torch.distributed as dist

import kclip
from kclip import console
from kclip.config.preflight import uses_cpu_accelerator
from kclip.dist.env import map_launcher_env

log = logging.getLogger(__name__)

_timeout: datetime.timedelta | None = None  # dist.timeout_s, for the process groups created after the default one
_node_group: dist.ProcessGroup | None = None
_shm_buffer: str | None = None  # this rank's DeepSpeed CPU allreduce buffer, once the process group exists


def remove_own_shm_buffer() -> None:
    # The other ranks mapped this file at start-up; removing its name leaves their mappings intact.
    if _shm_buffer is not None:
        with contextlib.suppress(OSError):
            os.remove(_shm_buffer)


class RendezvousError(RuntimeError):
    """Not every rank joined the process group within the rendezvous timeout."""


def init(timeout_s: float = 600.0, rendezvous_timeout_s: float | None = None) -> None:
    """Start the default process group (also for a single process: DeepSpeed engines need one).

    The ranks must all join within `rendezvous_timeout_s` (default: `timeout_s`); after that `timeout_s` bounds every
    collective on gloo, so a dead or diverged rank surfaces as an error instead of a hang.
    """
    global _timeout, _shm_buffer
    if dist.is_initialized():
        return
    began = time.monotonic()
    map_launcher_env()
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    rendezvous_timeout_s = rendezvous_timeout_s or timeout_s
    try:
        with console.printed_to_log("deepspeed.comm"):  # it print()s that its CPU communication op was built
            deepspeed.init_distributed(timeout=datetime.timedelta(seconds=rendezvous_timeout_s), verbose=False)
    except (dist.DistStoreError, dist.DistNetworkError) as e:
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if "EADDRINUSE" in str(e):  # rank 0 could not host the rendezvous: nothing to do with the others
            raise RendezvousError(f"rank {os.environ['RANK']}: MASTER_PORT {os.environ['MASTER_PORT']} is already in "
                                  f"use on this host (another job?): choose another port") from e
        raise RendezvousError(
            f"rank {os.environ['RANK']}: not every rank joined {where} within {rendezvous_timeout_s:g} s "
            f"(dist.rendezvous_timeout_s): {first_line}") from e
    _timeout = datetime.timedelta(seconds=timeout_s)
    dist.set_timeout(_timeout)
    if uses_cpu_accelerator():
        # At any interpreter exit, error exits included (a SIGKILL leaves it: tests and benchmarks sweep by port).
        _shm_buffer = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                       f"{os.environ['MASTER_PORT']}_{rank()}")
        atexit.register(remove_own_shm_buffer)
    if world_size() > 1:
        from kclip.dist import watchdog  # here, not at the top: watchdog imports this module

        watchdog.start(timeout_s)
    log_startup(f"DeepSpeed imported, process group of {world_size()} rank(s) started", began)


def log_startup(done: str, began: float) -> float:
    """Rank 0 logs a start-up phase as it ends, in one line: the seconds since the process started and the phase's
    own (from `began`, a time.monotonic()). Returns the time it logged at, the next phase's start. Where a short run's
    time goes before its first step; benchmarks/startup.py reads these lines."""
    now = time.monotonic()
    if is_main():
        log.info("start-up %.2f s: %s in %.2f s", now - kclip.STARTED, done, now - began)
    return now


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    """Ranks per node (launchers start the same number on every node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size())


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def node_index() -> int:
    return rank() // local_world_size()


def num_nodes() -> int:
    return world_size() // local_world_size()


def node_group() -> dist.ProcessGroup:
    """This node's ranks as a process group (ranks node_index() * local_world_size() onwards, as launchers number
    them). Collective on the first call: creating a group is, and every rank creates every node's group in the same
    order (torch's new_subgroups). Kept for the process's life, so later calls cost nothing. Needs the world to be a
    whole number of equal nodes (torch raises ValueError otherwise; kclip's config checks say so first)."""
    global _node_group
    if _node_group is None:
        _node_group, _ = dist.new_subgroups(group_size=local_world_size(), timeout=_timeout)
    return _node_group


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
