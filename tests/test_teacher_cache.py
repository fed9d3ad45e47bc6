"""The teacher embedding cache serves exactly what the teacher computed, and never rows of another teacher/dataset."""
import numpy as np
import pytest
import torch

from kclip.config import TeacherConfig
from kclip.models.teacher import build_teacher
from kclip.teacher_cache import TeacherCache, embed_cached
from kclip.validate import mds_num_samples
from shapes import make_shapes_mds

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384, max_position_embeddings=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=24))


def _batch(teacher, indices, captions):
    ids, mask = teacher.tokenize(captions)
    return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "index": torch.tensor(indices)}


def _cache(tmp_path, teacher, data):
    return TeacherCache(tmp_path, teacher_fingerprint=teacher.fingerprint, dataset_dir=data,
                        num_samples=mds_num_samples(data), dim=teacher.hidden_size)


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
