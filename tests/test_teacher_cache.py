"""The teacher embedding cache serves exactly what the teacher computed, and never rows of another teacher/dataset."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from shapes import make_shapes_mds

from kclip.config import TeacherConfig
from kclip.config.preflight import mds_num_samples
from kclip.teacher.cache import TeacherCache, embed_cached
from kclip.teacher.load import build_teacher

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384, max_position_embeddings=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=24))


def _batch(teacher, indices, captions):
    ids, mask = teacher.tokenize(captions)
    return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "index": torch.tensor(indices)}


def _cache(tmp_path, teacher, data, dtype="fp32"):
    return TeacherCache(tmp_path, teacher_fingerprint=teacher.fingerprint, dataset_dir=data,
                        num_samples=mds_num_samples(data), dim=teacher.hidden_size, unit_norm=teacher.cfg.normalize,
                        dtype=dtype)


def test_second_epoch_is_served_from_cache_with_identical_values(tmp_path, data):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    cache = _cache(tmp_path, teacher, data)
    batch = _batch(teacher, [3, 7, 11], ["a red circle", "a blue square", "a green triangle"])
    first = embed_cached(teacher, cache, batch)
    forwards = teacher.forwards
    cache.flush()
    reopened = _cache(tmp_path, teacher, data)
    second = embed_cached(teacher, reopened, batch)
    assert torch.equal(first, second)
    assert reopened.hit_rate == 1.0
    assert teacher.forwards == forwards  # only the (empty) miss set ran: embed skips it without a forward
    mixed = _batch(teacher, [7, 5], ["a blue square", "a red square"])
    out = embed_cached(teacher, reopened, mixed)
    torch.testing.assert_close(out, teacher.embed(mixed["teacher_input_ids"], mixed["teacher_attention_mask"]))


def test_other_teacher_or_damaged_files_are_never_reused(tmp_path, data):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    other = build_teacher(TeacherConfig(random_config=TINY, seed=1), shard=False)
    assert teacher.fingerprint != other.fingerprint
    cache = _cache(tmp_path, teacher, data)
    embed_cached(teacher, cache, _batch(teacher, [0], ["a red circle"]))
    cache.flush()
    assert _cache(tmp_path, other, data).folder != cache.folder
    with open(cache.folder / "emb.f32", "r+b") as f:
        f.truncate(10)  # a crash mid-write or a full disk
    rebuilt = _cache(tmp_path, teacher, data)
    assert not np.asarray(rebuilt.filled).any()


def test_a_cache_without_row_checksums_is_rebuilt_with_one_warning(tmp_path, data, caplog):
    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    cache = _cache(tmp_path, teacher, data)
    embed_cached(teacher, cache, _batch(teacher, [0], ["a red circle"]))
    cache.close()
    # As an older kclip leaves it: no "format" in meta.json, no crc32.u32.
    meta = json.loads((cache.folder / "meta.json").read_text())
    del meta["format"]
    (cache.folder / "meta.json").write_text(json.dumps(meta))
    (cache.folder / "crc32.u32").unlink()
    with caplog.at_level(logging.WARNING, logger="kclip.teacher.cache"):
        rebuilt = _cache(tmp_path, teacher, data)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "kclip.teacher.cache"]
    assert warning.startswith(f"teacher cache: {cache.folder} is in format 1, this kclip reads format 2: rebuilding")
    assert rebuilt.folder == cache.folder and not np.asarray(rebuilt.filled).any()
    rebuilt.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kclip.teacher.cache"):
        assert _cache(tmp_path, teacher, data).folder == cache.folder  # rebuilt once: no warning again
    assert not caplog.records


CAPTIONS = ["a red circle", "a blue square on a long grey road", "a green triangle", "two small yellow stars",
            "a purple hexagon", "an orange ring next to a very large black square"]


def _embed_as_two_nodes(cache_dir, data):
    """Rank r (alone on 'node' r) embeds captions 3r..3r+2, then looks up all six."""
    from kclip import dist

    teacher = build_teacher(TeacherConfig(random_config=TINY))
    cache = _cache(cache_dir, teacher, data)
    mine = list(range(3 * dist.rank(), 3 * dist.rank() + 3))
    embed_cached(teacher, cache, _batch(teacher, mine, [CAPTIONS[i] for i in mine]))
    forwards = teacher.forwards
    everything = embed_cached(teacher, cache, _batch(teacher, list(range(6)), CAPTIONS))
    cache.flush()
    return {"folder": str(cache.folder), "filled": np.asarray(cache.filled).copy(), "rows": np.asarray(cache.emb[:6]).copy(),
            "second_pass_hit_rate": (cache.hits - 0) / 6, "second_pass_forwards": teacher.forwards - forwards,
            "everything": everything.numpy()}


def test_every_node_stores_what_any_node_computed(tmp_path, data):
    from multiproc import run_ranks

    two_nodes = {"LOCAL_RANK": "0", "LOCAL_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    node0, node1 = run_ranks(_embed_as_two_nodes, str(tmp_path), data, env=two_nodes)
    assert Path(node0["folder"]).name == "node0" and Path(node1["folder"]).name == "node1"
    reference = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    expected = reference.embed(*reference.tokenize(CAPTIONS)).numpy()
    for node in (node0, node1):
        assert node["filled"][:6].all() and not node["filled"][6:].any()
        np.testing.assert_allclose(node["rows"], expected, atol=1e-5)
        np.testing.assert_array_equal(node["everything"], node["rows"])
        assert node["second_pass_hit_rate"] == 1.0  # the other node's captions too
        assert node["second_pass_forwards"] == 0


def _hold_lock(path, locked, release):
    import fcntl

    with open(path, "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked.set()
        release.wait(60)


def test_a_second_job_on_the_same_cache_dir_takes_the_next_slot(tmp_path, data):
    import multiprocessing as mp

    teacher = build_teacher(TeacherConfig(random_config=TINY), shard=False)
    first = _cache(tmp_path, teacher, data)
    embed_cached(teacher, first, _batch(teacher, [0], ["a red circle"]))
    first.close()
    assert first.folder.name == "node0"
    ctx = mp.get_context("spawn")
    locked, release = ctx.Event(), ctx.Event()
    other_job = ctx.Process(target=_hold_lock, args=(str(first.folder / "lock"), locked, release))
    other_job.start()
    try:
        assert locked.wait(60)
        second = _cache(tmp_path, teacher, data)
        assert second.folder.name == "node0-2"
        assert not np.asarray(second.filled).any()  # its own files: never written by two jobs at once
    finally:
        release.set()
        other_job.join()
    again = _cache(tmp_path, teacher, data)  # lock released (a requeued job): the filled slot is found again
    assert again.folder.name == "node0" and again.lookup(torch.tensor([0]))[1].all()
