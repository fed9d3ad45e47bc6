"""Checkpoints: DeepSpeed's engine state plus kclip's own state, with an atomic `latest` pointer.

Layout: <run>/checkpoints/step_00000100/ holds DeepSpeed's files, `rank_00000.pt` ... (per-rank state: RNG states
and the rank's teacher-embedding buffer, which differ between ranks) and `COMPLETE` once every rank has written.
`latest` is replaced atomically only after COMPLETE exists, so a kill during a save leaves the previous checkpoint
as `latest`.
"""
from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from kclip import dist

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


# A rank file holds tensors and numpy's RNG state (an ndarray): numpy's array reconstruction is all that torch's
# restricted unpickler needs beyond its defaults, so a run folder from someone else cannot run code at resume through it.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
RANK_STATE_GLOBALS = (_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


def read_rank_state(path: Path) -> dict:
    with torch.serialization.safe_globals(list(RANK_STATE_GLOBALS)):
        return torch.load(path, weights_only=True)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The run's complete step folders, oldest first. `step_X_universal` conversions are copies of `step_X`, not
    checkpoints of their own: they neither count towards `keep_last` nor get resumed from as a step."""
    return sorted(p for p in ckpt_dir.glob("step_*") if p.name[5:].isdigit() and (p / COMPLETE).is_file())


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all), each with its universal copy."""
    for old in complete_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old.with_name(f"{old.name}_universal"), ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int) -> Path:
    """Collective. Every rank writes its part; rank 0 marks the checkpoint complete, moves `latest`, prunes old ones.
    A write that fails on any rank (a full disk, a quota, an I/O error) fails the save on every rank with one line
    (CheckpointError), leaving no step folder behind and `latest` where it was."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    # A partial save of this step from a killed run.
    failed = _write_error(lambda: shutil.rmtree(tag_dir)) if dist.is_main() and tag_dir.exists() else 0
    # All-reduces where barriers would do: each also tells every rank whether any rank's write failed, so that all
    # fail together and none is left waiting for one that gave up.
    if not _on_any_rank(failed):
        failed = _write_rank_part(engine, ckpt_dir, tag, client_state, rank_state)
    if not _on_any_rank(failed) and dist.is_main():
        failed = _mark_complete(ckpt_dir, tag_dir, keep_last)
    failed = _on_any_rank(failed)
    if failed:
        if dist.is_main():
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise CheckpointError(f"{os.strerror(failed)}: {tag_dir}")
    return tag_dir


# How torch.save's zip writer reports a write that found no room: a RuntimeError without errno.
_SHORT_WRITE = ("unexpected pos", "file write failed", "iostream error")


def _write_error(write) -> int:
    """Run `write()`; the errno it failed with (ENOSPC for the zip writer's short write, EIO for an OSError without
    one), else 0. Errors other than the filesystem's propagate."""
    try:
        write()
    except OSError as e:
        return e.errno or errno.EIO
    except RuntimeError as e:
        if not any(m in str(e) for m in _SHORT_WRITE):
            raise
        return errno.ENOSPC
    return 0


def _on_any_rank(failed: int) -> int:
    """Collective: the largest errno any rank's write failed with (a quota's over a full disk's), else 0."""
    return dist.all_reduce_max(failed)


def _write_rank_part(engine, ckpt_dir: Path, tag: str, client_state: dict, rank_state: dict) -> int:
    """This rank's DeepSpeed files and `rank_<r>.pt`; the errno of a failed write (see _write_error). Collective
    (DeepSpeed's save)."""
    failed = _write_error(lambda: engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state,
                                                         save_latest=False))
    if failed:
        # With ZeRO-1/2 every file DeepSpeed writes comes after its collectives but one, the barrier ending its save:
        # take it here, so the ranks whose writes succeeded are released and every rank reaches the agreement.
        dist.barrier()
        return failed
    path = ckpt_dir / tag / f"rank_{dist.rank():05d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    failed = _write_error(lambda: torch.save(rank_state, tmp))
    if not failed:
        os.replace(tmp, path)
    return failed


def _mark_complete(ckpt_dir: Path, tag_dir: Path, keep_last: int) -> int:
    """Rank 0, once every rank has written: COMPLETE, then `latest`, then pruning; the errno of a failed write."""
    def write():
        _atomic_write(tag_dir / COMPLETE, f"world_size={dist.world_size()}\n")
        _atomic_write(ckpt_dir / "latest", tag_dir.name)

    failed = _write_error(write)
    if not failed:
        prune(ckpt_dir, keep_last)
    return failed


def resolve(run_dir: Path, resume: str) -> Path:
    """`latest` (the run's newest complete checkpoint) or a path to a step folder."""
    if resume == "latest":
        ckpt_dir = run_dir / "checkpoints"
        pointer = ckpt_dir / "latest"
        if not pointer.is_file():
            raise CheckpointError(f"--resume latest: no checkpoint in {ckpt_dir}")
        tag_dir = ckpt_dir / pointer.read_text().strip()
    else:
        tag_dir = Path(resume)
    if not (tag_dir / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is missing or incomplete{_others_hint(tag_dir)}")
    return tag_dir


def _others_hint(tag_dir: Path) -> str:
    others = [str(p) for p in complete_checkpoints(tag_dir.parent) if p != tag_dir]
    return f"; resume from an earlier one with --resume {others[-1]}" if others else ""


def saved_world_size(tag_dir: Path) -> int:
    return int((tag_dir / COMPLETE).read_text().strip().split("=")[1])


def optimizer_partitioned(tag_dir: Path) -> bool:
    """Whether DeepSpeed saved the optimizer state in per-rank partitions (ZeRO-1/2, and its bf16 optimizer at any
    stage) rather than whole in the model-state file (ZeRO stage 0 in fp32), which any world size loads as it is."""
    return any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))


def check_optimizer_layout(tag_dir: Path, partitions: bool, zero_stage: int) -> None:
    """One line instead of DeepSpeed's missing-file error when the run and the checkpoint disagree on partitioning."""
    if optimizer_partitioned(tag_dir) == partitions:
        return
    saved = "partitioned over its ranks (ZeRO-1/2 or bf16)" if not partitions else "whole (ZeRO stage 0, fp32)"
    raise CheckpointError(f"checkpoint {tag_dir} holds its optimizer state {saved}, which this run "
                          f"(train.zero_stage={zero_stage}) cannot load: resume with the stage and precision it was "
                          f"saved with")


def universal_copy(tag_dir: Path) -> Path:
    """Collective. DeepSpeed's ZeRO-1/2 optimizer state is partitioned by world size; to resume on another world
    size the checkpoint is converted once (on rank 0) to DeepSpeed's world-size-independent universal format, which
    an engine started with `checkpoint.load_universal` reads."""
    out = tag_dir.parent / f"{tag_dir.name}_universal"
    if dist.is_main() and not (out / COMPLETE).is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        ds_to_universal(argparse.Namespace(
            input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))
        _atomic_write(out / COMPLETE, f"world_size={saved_world_size(tag_dir)}\n")
    dist.barrier()
    return out


def load(engine, tag_dir: Path, engine_dir: Path | None = None) -> tuple[dict, dict | None]:
    """Collective. Returns (client_state, this rank's state or None when the rank did not exist in the saved run).
    `engine_dir` is where DeepSpeed's files are read from when that is not `tag_dir` (a universal copy)."""
    engine_dir = engine_dir or tag_dir
    try:
        path, client_state = engine.load_checkpoint(str(engine_dir.parent), tag=engine_dir.name)
    except Exception as e:  # DeepSpeed raises many kinds for damaged files; the user needs the path and the cause
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded ({type(e).__name__}: {str(e)[:200]})"
                              f"{_others_hint(tag_dir)}") from e
    if path is None:
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded by DeepSpeed")
    rank_file = tag_dir / f"rank_{dist.rank():05d}.pt"
    rank_state, error = None, None
    try:
        rank_state = read_rank_state(rank_file) if rank_file.is_file() else None
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt pickle raises many kinds
        error = f"checkpoint {tag_dir}: {rank_file.name} could not be loaded ({type(e).__name__}: {str(e)[:200]})"
    # Every rank fails together: a rank left alone in its next collective would hang until the timeout.
    if dist.all_reduce_max(int(error is not None)):
        raise CheckpointError((error or f"checkpoint {tag_dir}: another rank's rank_*.pt could not be loaded")
                              + _others_hint(tag_dir))
    return client_state, rank_state
