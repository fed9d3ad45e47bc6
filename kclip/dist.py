"""Process-group setup and the few collectives kclip needs.

Every launcher names its ranks differently (the deepspeed launcher, torchrun, SLURM's srun, or nothing at all for a
plain single process). `map_launcher_env` turns all of them into the variables that torch, DeepSpeed and
mosaicml-streaming read, so nothing else in kclip looks at launcher-specific variables.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import NoReturn

import torch
import torch.distributed as dist

import kclip
from kclip import console

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it); for single-node rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_tasks_per_node(env) -> int:
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    # SLURM_TASKS_PER_NODE looks like "4(x2)" or "4,3": the first count is this layout's per-node size.
    first = env.get("SLURM_TASKS_PER_NODE", "1").split(",")[0]
    return int(first.split("(")[0])


def _slurm_master_addr(env) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def map_launcher_env(env: dict | None = None) -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR and MASTER_PORT in `env`.

    - deepspeed launcher: sets LOCAL_SIZE but not LOCAL_WORLD_SIZE, which streaming needs (it otherwise fails with
      `FileExistsError: '/000000_locals'`).
    - torchrun: sets LOCAL_WORLD_SIZE but not LOCAL_SIZE, which DeepSpeed's CPU accelerator uses as device count.
    - srun with one task per GPU: only SLURM_* variables exist.
    - nothing: a single process, world size 1.
    """
    env = os.environ if env is None else env
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = str(_slurm_tasks_per_node(env))
        env.setdefault("MASTER_ADDR", _slurm_master_addr(env))
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    local_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"]
    env["LOCAL_WORLD_SIZE"] = local_size
    env["LOCAL_SIZE"] = local_size
    env.setdefault("LOCAL_RANK", "0")


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
_timeout: datetime.timedelta | None = None  # dist.timeout_s, for the process groups created after the default one
_node_group: dist.ProcessGroup | None = None


# DeepSpeed's CPU accelerator maps one allreduce workspace per rank into /dev/shm (69,206,024 bytes measured with
# DeepSpeed 0.19.8), named deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never removes it. A Docker
# container's default /dev/shm is 64 MiB: the first rank then dies of a Bus error before step 1, printing nothing.
SHM_BUFFER_BYTES = 69_206_024


def uses_cpu_accelerator() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def shm_buffer_glob(port: int | str | None = None) -> str:
    """The shared-memory files DeepSpeed's CPU allreduce creates: all of this user's, or those of the group on `port`."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*" + (f"_{port}_*" if port is not None else "")


def shm_shortfall(ranks_on_node: int) -> str | None:
    """One line when /dev/shm cannot hold the CPU allreduce buffers of this node's ranks; None when it can."""
    if not uses_cpu_accelerator() or not os.path.isdir("/dev/shm"):
        return None
    free, need = shutil.disk_usage("/dev/shm").free, ranks_on_node * SHM_BUFFER_BYTES
    if free >= need:
        return None
    return (f"/dev/shm has {free / 2**20:.0f} MiB free; DeepSpeed's CPU accelerator needs {need / 2**20:.0f} MiB "
            f"({ranks_on_node} rank(s) x {SHM_BUFFER_BYTES / 2**20:.0f} MiB): raise it (docker run --shm-size=1g) or "
            f"remove stale {shm_buffer_glob()} files of finished runs")


_shm_buffer: str | None = None  # this rank's DeepSpeed CPU allreduce buffer, once the process group exists


def _remove_own_shm_buffer() -> None:
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
    global _heartbeat, _timeout, _shm_buffer
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
        atexit.register(_remove_own_shm_buffer)
    if world_size() > 1:
        # Heartbeats come a second apart: a watchdog tighter than ten of them would take jitter for a death.
        _heartbeat = Heartbeat(watch_s=max(timeout_s, 10.0))
    log_startup(f"DeepSpeed imported, process group of {world_size()} rank(s) started", began)


def log_startup(done: str, began: float) -> float:
    """Rank 0 logs a start-up phase as it ends, in one line: the seconds since the process started and the phase's
    own (from `began`, a time.monotonic()). Returns the time it logged at, the next phase's start. Where a short run's
    time goes before its first step; benchmarks/startup.py reads these lines."""
    now = time.monotonic()
    if is_main():
        log.info("start-up %.2f s: %s in %.2f s", now - kclip.STARTED, done, now - began)
    return now


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
    _remove_own_shm_buffer()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward routes each rank's slice of the summed gradient back to it.

    Every rank's loss depends on every rank's rows, so the gradient of row block r is the sum over ranks of
    d(loss_rank)/d(block r): an all-reduce of the incoming gradient followed by taking our own block. Combined with
    DeepSpeed's gradient averaging this gives exactly the gradient of the global mean loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (equal shapes required), differentiably. Identity on one process."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def _padded_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """`x` on the communication device, zero-padded to the largest row count over ranks, and every rank's count."""
    x = x.to(device())
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return padded, counts


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs across ranks (no gradient), in rank order. Works for CPU
    tensors under NCCL too (they travel through the communication device and come back)."""
    if world_size() == 1:
        return x
    home = x.device
    padded, counts = _padded_rows(x)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(home)


def gather_rows(x: torch.Tensor, dst: int = 0) -> tuple[torch.Tensor, int]:
    """Like `all_gather_rows`, but only rank `dst` receives the rows (others get an empty tensor): memory for one
    copy instead of one per rank. Also returns the total row count, known on every rank."""
    if world_size() == 1:
        return x, x.shape[0]
    home = x.device
    padded, counts = _padded_rows(x)
    parts = [torch.empty_like(padded) for _ in counts] if rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if rank() != dst:
        return x[:0], sum(counts)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(home), sum(counts)


def all_reduce_max(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _on_comm_device(collective, t: torch.Tensor) -> torch.Tensor:
    """Run an in-place collective on `t`; NCCL only takes CUDA tensors, so CPU tensors (embedding buffers,
    centroids, flags) take a round trip through the communication device."""
    if t.device == device():
        collective(t)
    else:
        moved = t.to(device())
        collective(moved)
        t.copy_(moved)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it."""
    if world_size() > 1:
        _on_comm_device(dist.all_reduce, t)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        _on_comm_device(lambda x: dist.broadcast(x, src=src), t)
    return t


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
