"""The launch environment. Every launcher names its ranks differently (the deepspeed launcher, torchrun, SLURM's
srun, or nothing at all for a plain single process). `map_launcher_env` turns all of them into the variables that
torch, DeepSpeed and mosaicml-streaming read, so nothing else in kclip looks at launcher-specific variables."""
from __future__ import annotations

import os
import socket
import subprocess


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
