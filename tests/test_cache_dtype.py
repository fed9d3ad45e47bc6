"""teacher.cache_dtype: half-size teacher caches (bf16 kept as the upper 16 bits of each float32, fp16) serve the rows
rounded to half precision (also in the epoch that computes them), still find damaged rows, allow the rounding in their
norm check, and are never read as another dtype."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shapes import make_shapes_mds
from test_faults_cache import _damage
from test_teacher_cache import CAPTIONS, TINY, _batch, _cache

from kclip.config import Config, ConfigError, TeacherConfig
from kclip.config.schema import check_section
from kclip.teacher.cache import (
    STORAGE,
    decode_rows,
    embed_cached,
    encode_rows,
    norm_tolerance,
    open_cache,
)
from kclip.teacher.load import build_teacher

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=24))


@pytest.mark.parametrize("dtype", HALF)
def test_half_caches_serve_the_teachers_rows_rounded_in_half_the_space(tmp_path, data, dtype):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    cfg = Config()
    cfg.teacher.cache_dtype, cfg.teacher.cache_dir, cfg.data.train = dtype, str(tmp_path), data
    cache = open_cache(cfg, teacher, tmp_path)
    batch = _batch(teacher, list(range(6)), CAPTIONS)
    expected = teacher.embed(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    computed = embed_cached(teacher, cache, batch)
    cache.close()
    forwards = teacher.forwards
    reopened = _cache(tmp_path, teacher, data, dtype)
    served = embed_cached(teacher, reopened, batch)
    assert reopened.hit_rate == 1.0 and teacher.forwards == forwards and reopened.corrupt_rows == 0
    assert torch.equal(served, expected.to(HALF[dtype]).float())
    assert torch.equal(computed, served)  # the epoch that computes the rows trains on the targets later epochs read
    emb_file = reopened.folder / STORAGE[dtype][0]
    assert emb_file.stat().st_size == 24 * TINY["hidden_size"] * 2


def test_bf16_is_stored_as_the_upper_half_of_float32_rounded_to_nearest():
    exact = torch.tensor([[1.0, -2.5, 0.15625, 1.5 * 2.0**100]])  # representable in bfloat16
    bits = exact.numpy().view(np.uint32) >> 16
    assert np.array_equal(encode_rows(exact, "bf16"), bits.astype(np.uint16))
    # 1 + 3/4 of bfloat16's step at 1 (2^-7): rounds up, where keeping the upper half alone would truncate to 1
    assert decode_rows(encode_rows(torch.tensor([[1 + 3 * 2**-9]]), "bf16"), "bf16")[0, 0] == 1 + 2**-7


@pytest.mark.parametrize("dtype", HALF)
def test_the_norm_check_allows_the_rounding_of_half_precision(tmp_path, data, dtype):
    eps = torch.finfo(HALF[dtype]).eps
    assert norm_tolerance(dtype) >= 2 * (eps / 2) + (eps / 2) ** 2  # the worst case of rounding every element
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(4096, width, generator=g) for width in (32, 576)]
    # decoder-LM embeddings share one dominant direction: a few large elements carry most of the norm
    rows.append(torch.randn(4096, 576, generator=g) + 30 * F.one_hot(torch.tensor(7), 576))
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    cache = _cache(tmp_path, teacher, data, dtype)
    for unit in (F.normalize(r, dim=1) for r in rows):
        read = decode_rows(encode_rows(unit, dtype), dtype)
        assert cache.intact(read).all()
        assert np.abs(np.einsum("ij,ij->i", read, read) - 1).max() < norm_tolerance(dtype) / 2
    assert norm_tolerance("fp32") == 1e-3  # float32 caches keep their check as it was


@pytest.mark.parametrize("dtype", HALF)
def test_damaged_half_rows_are_recomputed_and_counted(tmp_path, data, dtype):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    batch = _batch(teacher, list(range(6)), CAPTIONS)
    expected = teacher.embed(batch["teacher_input_ids"], batch["teacher_attention_mask"]).to(HALF[dtype]).float()
    cache = _cache(tmp_path, teacher, data, dtype)
    embed_cached(teacher, cache, batch)
    _damage(cache, np.random.default_rng(0))
    cache.close()
    damaged = _cache(tmp_path, teacher, data, dtype)
    emb, hit = damaged.lookup(batch["index"])
    assert hit.tolist() == [True, False, False, False, False, True] and damaged.corrupt_rows == 4
    assert torch.equal(emb[hit], expected[hit]) and not emb[~hit].any()


def test_a_cache_is_never_read_in_another_dtype(tmp_path, data):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    bf16 = _cache(tmp_path, teacher, data, "bf16")
    embed_cached(teacher, bf16, _batch(teacher, [0, 1], CAPTIONS[:2]))
    bf16.close()
    others = {dtype: _cache(tmp_path, teacher, data, dtype) for dtype in ("fp32", "fp16")}
    for cache in others.values():  # a folder of their own: the dtype is part of the key
        assert cache.folder != bf16.folder and not np.asarray(cache.filled).any()
        cache.close()
    # bf16 bits under the fp16 file name, with their meta.json (copied by hand, or a key collision): rebuilt, not read
    fp16_folder = others["fp16"].folder
    shutil.copy(bf16.folder / "emb.bf16", fp16_folder / "emb.f16")
    for name in ("filled.u8", "meta.json"):
        shutil.copy(bf16.folder / name, fp16_folder / name)
    reopened = _cache(tmp_path, teacher, data, "fp16")
    assert reopened.folder == fp16_folder and not np.asarray(reopened.filled).any()
    assert _cache(tmp_path, teacher, data, "bf16").lookup(torch.tensor([0, 1]))[1].all()  # its own rows still there


def test_cache_dtype_config():
    with pytest.raises(ConfigError, match=r"^teacher.cache_dtype: 'fp8' is not one of \['fp32', 'bf16', 'fp16'\]$"):
        check_section(TeacherConfig(cache_dtype="fp8"), "teacher.")
    with pytest.raises(ConfigError, match=r"^teacher.cache_dtype: fp16 needs teacher.normalize=true"):
        TeacherConfig(cache_dtype="fp16", normalize=False).check()
    TeacherConfig(cache_dtype="bf16", normalize=False).check()  # bfloat16 has float32's range


def test_training_on_a_bf16_cache_follows_the_fp32_run_within_rounding(tmp_path):
    """A whole run (smoke config, 2 epochs of 96 pairs, whitened distillation targets and concepts fitted on cached rows)
    on a bf16 cache: the first epoch computes every row and trains on it rounded to bf16, as the second reads it back.
    From the first step the two runs drift apart as any two trajectories with slightly different targets do (up to
    0.5% in loss here, with whitened targets, which amplify small differences): a bf16 cache is a usable cache, not a
    different experiment."""
    from test_train import losses, run_ok, train_cmd

    from kclip.train.metrics import read_metrics

    shapes = make_shapes_mds(tmp_path / "shapes", n=96)
    runs = {}
    for dtype in ("fp32", "bf16"):
        run = tmp_path / dtype
        run_ok(train_cmd(run, shapes, "train.steps=12", "log.every=1", f"teacher.cache_dtype={dtype}",
                         f"teacher.cache_dir={tmp_path / 'cache'}"))
        runs[dtype] = (losses(run), {r["step"]: r["teacher_cache_hit_rate"] for r in read_metrics(run)
                                     if "teacher_cache_hit_rate" in r})
    (fp32, fp32_hits), (bf16, bf16_hits) = runs["fp32"], runs["bf16"]
    # the hit rate is cumulative: 0 after the first epoch, 1/2 after the second (all hits)
    assert fp32_hits == bf16_hits and fp32_hits[6] == 0.0 and fp32_hits[12] == 0.5
    assert all(abs(fp32[s] - bf16[s]) <= 2e-2 * abs(fp32[s]) for s in range(1, 13)), (fp32, bf16)
    assert fp32[1] != bf16[1]  # the first epoch trains on the rounded rows too
