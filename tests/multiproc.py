"""Run a function on N CPU ranks the way DeepSpeed's own tests do: spawned processes with RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR and a free port set, the DeepSpeed CPU accelerator and gloo, and a short
collective timeout so a hang fails the test quickly instead of eating CI time."""
from __future__ import annotations

import glob
import multiprocessing as mp
import os
import queue
import time
import traceback

from kclip.config.preflight import shm_buffer_glob
from kclip.dist import free_port

COLLECTIVE_TIMEOUT_S = 60


def _child(fn, args, rank, world_size, port, results, extra_env):
    try:
        # extra_env may override the single-node defaults: LOCAL_SIZE=2 makes nodes of 2 ranks (rank r its node's
        # r % 2, as launchers number them), LOCAL_SIZE=1 every rank its own node.
        local_size = int(extra_env.get("LOCAL_SIZE", world_size))
        os.environ.update({
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank % local_size), "WORLD_SIZE": str(world_size), "LOCAL_SIZE": str(local_size),
            "LOCAL_WORLD_SIZE": str(local_size),
            "DS_ACCELERATOR": "cpu", **extra_env,
        })
        import torch

        torch.set_num_threads(1)
        from kclip import dist

        dist.init(timeout_s=COLLECTIVE_TIMEOUT_S)
        # Tensors cross process boundaries by shared file descriptors that die with this process: send numpy.
        result = fn(*args)
        if isinstance(result, torch.Tensor):
            result = result.detach().cpu().numpy()
        results.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - the parent must see every failure, including SystemExit
        results.put((rank, "err", traceback.format_exc()))


def cleanup_shm(port: int | None = None) -> None:
    """Spawned ranks end with os._exit, which skips kclip's own removal at exit: sweep their buffers by port."""
    for path in glob.glob(shm_buffer_glob(port)):
        try:
            os.remove(path)
        except OSError:
            pass


def run_ranks(fn, *args, world_size: int = 2, timeout: float = 240, env: dict | None = None) -> list:
    """Run `fn(*args)` on `world_size` ranks; return the per-rank results in rank order.

    `fn` must be importable (module level). Raises with the child's traceback if any rank fails or time runs out.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, args, r, world_size, port, results, env or {}), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                # A rank killed before it could report (segfault, OOM kill) would otherwise cost the whole timeout.
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"rank(s) {dead} died without reporting (exit codes "
                                  f"{[procs[r].exitcode for r in dead]})")
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout}s (got {sorted(out)})") from None
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        cleanup_shm(port)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world_size)]
