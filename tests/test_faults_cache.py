"""Faults of the disk under the teacher cache and the checkpoints: a disk too small or filling up mid-save, and cache
rows damaged on disk. Full disks are simulated (monkeypatched fallocate, torch.save writing to /dev/full), not made."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from shapes import make_shapes_mds
from test_teacher_cache import CAPTIONS, TINY, _batch, _cache
from test_train import REPO, _env

from kclip.config import TeacherConfig
from kclip.teacher.cache import (
    TeacherCache,
    TeacherCacheError,
    embed_cached,
    encode_rows,
)
from kclip.teacher.load import build_teacher


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=24))


def _no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _allocated(path: Path) -> bool:
    return path.stat().st_blocks * 512 >= path.stat().st_size > 0


def test_cache_files_get_their_disk_blocks_when_opened(tmp_path, data):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)

    def open_cache():  # rows for more samples than the data has: an emb.f32 of many blocks, so it can have holes
        return TeacherCache(tmp_path, teacher_fingerprint=teacher.fingerprint, dataset_dir=data, num_samples=4096,
                            dim=teacher.hidden_size, unit_norm=True)

    cache = open_cache()
    assert all(_allocated(cache.folder / name) for name in ("emb.f32", "filled.u8", "crc32.u32"))
    first = embed_cached(teacher, cache, _batch(teacher, [5], ["a red circle"]))
    cache.close()
    # A cache written sparse (as kclip wrote them before): its one row kept, its holes allocated at the next open.
    emb_path = cache.folder / "emb.f32"
    row, size = np.asarray(cache.emb[5]).tobytes(), emb_path.stat().st_size
    emb_path.unlink()
    with open(emb_path, "wb") as f:
        f.seek(5 * len(row))
        f.write(row)
        f.truncate(size)
    assert not _allocated(emb_path)
    reopened = open_cache()
    assert reopened.folder == cache.folder and _allocated(emb_path)
    emb, hit = reopened.lookup(torch.tensor([5]))
    assert hit.all() and torch.equal(emb, first)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT], ids=["disk_full", "quota"])
def test_a_disk_too_small_for_the_cache_fails_at_open_in_one_line(tmp_path, data, monkeypatch, error):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)

    def no_space(*args):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(TeacherCacheError) as failure:
        _cache(tmp_path, teacher, data)
    message = str(failure.value)
    emb_bytes = 24 * TINY["hidden_size"] * 4
    assert message.startswith(f"{os.strerror(error)}: ") and "\n" not in message
    assert message.endswith(f"emb.f32 (needs {emb_bytes / 1e9:.3g} GB)")
    (folder,) = tmp_path.glob("*/node0")
    assert (folder / "emb.f32").stat().st_size == 0 and not (folder / "meta.json").exists()
    monkeypatch.undo()  # space freed: the next open builds the cache
    assert not np.asarray(_cache(tmp_path, teacher, data).filled).any()


# Run as `python -c FAULT COMMAND ...`, so that exit code and stderr are what a user sees. FAULT (an errno name) is
# how the disk fails: ENOSPC, the disk fills (the teacher cache's allocation fails, the second checkpoint's files go
# to /dev/full); any other, the second checkpoint's writes raise it.
_CLI_WITH_FAILING_DISK = """
import errno, os, sys, torch
fault = getattr(errno, sys.argv.pop(1))
def failing(*args):
    raise OSError(fault, os.strerror(fault))
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if "step_00000002" in str(f):
        if fault != errno.ENOSPC:
            failing()
        f = "/dev/full"
    return real_save(obj, f, *args, **kwargs)
if sys.argv[1] == "teacher-cache":
    os.posix_fallocate = failing
torch.save = save
from kclip.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_with_failing_disk(fault: str, command: str, run: Path, data: str,
                           *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CLI_WITH_FAILING_DISK, fault, command, "--config", "smoke",
                           "--output", str(run), f"data.train={data}", "dist.timeout_s=60", *overrides], env=_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_kclip_teacher_cache_on_a_full_disk_says_so_in_one_line(tmp_path, data):
    run = tmp_path / "run"
    line = _one_error_line(_cli_with_failing_disk("ENOSPC", "teacher-cache", run, data))
    assert line.startswith(f"kclip: error: No space left on device: {run / 'teacher_cache'}") and "GB)" in line


@pytest.mark.parametrize("fault", ["ENOSPC", "EIO"], ids=["disk_full", "io_error"])
def test_kclip_train_whose_disk_fills_during_a_save_stops_in_one_line(tmp_path, data, fault):
    """A full disk, or any other write error (EIO: a failing disk, a network file system gone away)."""
    run = tmp_path / "run"
    line = _one_error_line(_cli_with_failing_disk(fault, "train", run, data, "train.steps=3", "checkpoint.every=1"))
    why = os.strerror(getattr(errno, fault))
    assert line == f"kclip: error: {why}: {run / 'checkpoints' / 'step_00000002'}"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000001"]


def _save_while_disks_fill(ckpt_dir: str) -> list:
    """A tiny ZeRO-1 engine saves step 1, then steps whose writes fail on some ranks (DeepSpeed's files, kclip's
    rank file, rank 0's COMPLETE; a full disk, then a quota, then an I/O error), then step 10: what each save raised,
    and what each left on disk."""
    import deepspeed

    from kclip import dist
    from kclip.train import checkpoint

    module = torch.nn.Linear(4, 2)
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1), config={
        "train_batch_size": dist.world_size(), "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
    ckpt_dir, last = Path(ckpt_dir), dist.world_size() - 1
    real_save, real_write = torch.save, checkpoint._atomic_write

    def disk_fills(ranks, files, raises=None):  # raises: {rank: the errno its writes fail with}
        def save(obj, f, *args, **kwargs):
            if dist.rank() in (raises or {}) and files(str(f)):
                raise OSError(raises[dist.rank()], os.strerror(raises[dist.rank()]))
            return real_save(obj, "/dev/full" if dist.rank() in ranks and files(str(f)) else f, *args, **kwargs)
        return save

    deepspeed_files, rank_file = (lambda f: not f.endswith(".pt.tmp")), (lambda f: f.endswith(".pt.tmp"))
    faults = {2: disk_fills({0, last}, deepspeed_files), 3: disk_fills({0}, deepspeed_files),
              4: disk_fills({last}, deepspeed_files), 5: disk_fills({last}, rank_file), 6: None,
              7: disk_fills(set(), rank_file, {last: errno.EDQUOT}),
              8: disk_fills({0}, rank_file, {last: errno.EDQUOT}),
              9: disk_fills(set(), deepspeed_files, {last: errno.EIO})}
    seen = []
    for step in range(1, 11):
        torch.save = faults.get(step) or real_save
        checkpoint._atomic_write = _no_space if step == 6 else real_write
        try:
            checkpoint.save(engine, ckpt_dir, step, {"step": step}, {"rank": dist.rank()}, keep_last=0)
            error = None
        except checkpoint.CheckpointError as e:
            error = str(e)
        finally:
            torch.save, checkpoint._atomic_write = real_save, real_write
        dist.barrier()
        seen.append((step, error, sorted(p.name for p in ckpt_dir.glob("step_*")), (ckpt_dir / "latest").read_text()))
        dist.barrier()
    return seen


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_checkpoint_save_on_a_full_disk_or_quota_fails_on_every_rank_and_leaves_latest(tmp_path, world_size):
    """Also any other write error (EIO), which no rank but the last sees."""
    from multiproc import run_ranks

    ckpt_dir = tmp_path / "checkpoints"
    for seen in run_ranks(_save_while_disks_fill, str(ckpt_dir), world_size=world_size):
        for step, error, names, latest in seen:
            if step in (1, 10):
                assert error is None and latest == f"step_{step:08d}"
            else:  # every rank hears of it, also those whose own writes succeeded; nothing is left behind
                # Step 8, a full disk on rank 0 and a quota on the last rank: the quota, the likelier to need action
                why = os.strerror(errno.ENOSPC if step < 7 else errno.EDQUOT if step < 9 else errno.EIO)
                assert error == f"{why}: {ckpt_dir / f'step_{step:08d}'}"
                assert latest == "step_00000001" and names == ["step_00000001"]
        assert seen[-1][2] == ["step_00000001", "step_00000010"]


def _damage(cache, rng) -> None:
    """Row 1: random bytes (a failing disk); 2: zeros (a page lost in a crash, marked filled); 3: one NaN;
    4: its second half zeros (a torn write). In the cache's storage dtype."""
    row_bytes = cache.emb.shape[1] * cache.emb.itemsize
    cache.emb[1] = np.frombuffer(rng.bytes(row_bytes), dtype=cache.emb.dtype)
    cache.emb[2] = 0
    cache.emb[3, 5] = encode_rows(torch.tensor([[np.nan]]), cache.dtype)[0, 0]
    cache.emb[4, cache.emb.shape[1] // 2:] = 0
    cache.flush()


def test_damaged_rows_are_recomputed_overwritten_and_counted(tmp_path, data):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    batch = _batch(teacher, list(range(6)), CAPTIONS)
    expected = teacher.embed(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    cache = _cache(tmp_path, teacher, data)
    embed_cached(teacher, cache, batch)
    _damage(cache, np.random.default_rng(0))
    cache.close()
    damaged = _cache(tmp_path, teacher, data)
    torch.testing.assert_close(embed_cached(teacher, damaged, batch), expected)
    assert damaged.corrupt_rows == 4 and damaged.hits == 2
    damaged.close()
    repaired = _cache(tmp_path, teacher, data)  # the recomputed rows were written back
    torch.testing.assert_close(embed_cached(teacher, repaired, batch), expected)
    assert repaired.corrupt_rows == 0 and repaired.hit_rate == 1.0


def test_without_normalisation_non_finite_zero_and_random_rows_are_still_found(tmp_path, data):
    teacher = build_teacher(TeacherConfig(random_config=TINY, normalize=False), shard=False)
    batch = _batch(teacher, list(range(6)), CAPTIONS)
    cache = _cache(tmp_path, teacher, data)
    assert not cache.unit_norm
    clean = embed_cached(teacher, cache, batch)
    assert cache.intact(clean.numpy()).all()  # the teacher's own rows, whatever their norm, are never rejected
    _damage(cache, np.random.default_rng(0))
    emb, hit = cache.lookup(batch["index"])
    # The torn row (4) keeps a plausible norm, which no norm check could tell from an embedding: its checksum does.
    assert hit.tolist() == [True, False, False, False, False, True] and cache.corrupt_rows == 4
    assert not emb[~hit].any()


def _recompute_on_one_rank(cache_dir: str, data: str) -> dict:
    """Both ranks (one node, one cache) fill rows 0-5, rank r rows 3r..3r+2; rank 0 damages two of its rows, then
    both ask again for their own rows: only rank 0 has misses, both must still run the same teacher forwards."""
    from kclip import dist

    teacher = build_teacher(TeacherConfig(random_config=TINY))
    cache = _cache(cache_dir, teacher, data)
    mine = list(range(3 * dist.rank(), 3 * dist.rank() + 3))
    batch = _batch(teacher, mine, [CAPTIONS[i] for i in mine])
    embed_cached(teacher, cache, batch)
    if dist.rank() == 0:
        cache.emb[1] = np.frombuffer(np.random.default_rng(1).bytes(cache.emb.shape[1] * 4), dtype=np.float32)
        cache.emb[2] = 0
    dist.barrier()
    forwards = teacher.forwards
    again = embed_cached(teacher, cache, batch)
    dist.barrier()
    return {"again": again.numpy(), "corrupt": cache.corrupt_rows, "forwards": teacher.forwards - forwards,
            "rows": np.asarray(cache.emb[:6]).copy()}


def test_damaged_rows_on_one_rank_are_recomputed_in_step_with_the_other(tmp_path, data):
    from multiproc import run_ranks

    rank0, rank1 = run_ranks(_recompute_on_one_rank, str(tmp_path), data)
    reference = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    expected = reference.embed(*reference.tokenize(CAPTIONS)).numpy()
    assert rank0["corrupt"] == 2 and rank1["corrupt"] == 0
    assert rank0["forwards"] == rank1["forwards"] == 1  # rank 1 ran a dummy forward for rank 0's recompute
    np.testing.assert_allclose(rank0["again"], expected[:3], atol=1e-5)
    np.testing.assert_allclose(rank1["again"], expected[3:], atol=1e-5)
    np.testing.assert_allclose(rank1["rows"], expected, atol=1e-5)  # overwritten in the node's one copy
