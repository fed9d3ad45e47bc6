"""The frozen teacher: ZeRO-3 on 2 CPU ranks gives the single-process embeddings, holds only its shard, never hangs on
uneven batches, does not leak partitioning into later models; packing and bucketing keep the embeddings; config
derivation; the real small teacher."""
import contextlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from transformers import LlamaConfig, LlamaModel

from kclip.config import ConfigError, StudentConfig, TeacherConfig
from kclip.teacher import fetch
from kclip.teacher.load import build_teacher, teacher_ds_config
from kclip.teacher.model import Teacher
from kclip.teacher.packing import pack_right, pack_rows
from kclip.tokenizers import load_tokenizer

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=128)
CAPTIONS = ["a dog", "a small brown puppy running on wet grass", "x", "an automobile parked on a road",
            "two cats", "a red car at night in the rain with lights"]
# Uneven on purpose: with chunk_size 2, rank 0 runs 3 chunks and rank 1 one (then 2 dummies); in the second call
# rank 1 has no caption at all.
RANK_ROWS = [[0, 1, 2, 3, 4], [5]]
RANK_ROWS_SECOND = [[1, 3, 5], []]
VARIANTS = {"mean_last_layer": dict(pooling="mean", layer=-1), "last_token": dict(pooling="last", layer=-1),
            "mean_middle_layer": dict(pooling="mean", layer=1)}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny random Llama saved like a real checkpoint, with the byte tokenizer (its 259 ids fit the 384 vocab)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    load_tokenizer("byte").save_pretrained(folder)
    return str(folder)


def assert_close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual), expected, atol=1e-5, rtol=0)


def teacher_cfg(folder, **kw) -> TeacherConfig:
    """One caption per row unless a test asks for packing: the forward counts below are per caption chunk."""
    return TeacherConfig(path=folder, **{"chunk_size": 2, "packing": False, **kw})


def tokens(teacher, rows):
    ids, mask = teacher.tokenize([CAPTIONS[i] for i in rows] or [""])
    return ids[: len(rows)], mask[: len(rows)]


def _sharded_run(folder):
    """Everything that needs the 2-rank ZeRO-3 teacher, in one spawn (starting ranks dominates the test time).
    Arrays go back as numpy: a tensor crosses the result queue as a shared-memory handle that dies with its rank."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from kclip import dist
    from kclip.models.student import build_student

    r = dist.rank()
    out = {"embeddings": {}, "forwards": {}}
    for name, kw in VARIANTS.items():
        t = build_teacher(teacher_cfg(folder, **kw))
        out["embeddings"][name] = t.embed(*tokens(t, RANK_ROWS[r])).numpy()
        out["forwards"][name] = t.forwards
        out["fingerprint_" + name] = t.fingerprint
        if name == "mean_last_layer":
            out["sharded"] = t.sharded
            out["second_call"] = t.embed(*tokens(t, RANK_ROWS_SECOND[r])).numpy()
            params = list(t.module.module.parameters())
            out["all_teacher_params_have_ds_id"] = all(hasattr(p, "ds_id") for p in params)
            out["ds_numel"] = sum(p.ds_numel for p in params)
            out["local_numel"] = sum(p.ds_tensor.numel() for p in params)
            out["expected_local_numel"] = sum(math.ceil(p.ds_numel / dist.world_size()) for p in params)
            # Only the tiny persistent parameters (norm weights, <= stage3_param_persistence_threshold) stay gathered.
            out["gathered_non_persistent"] = sum(p.data.numel() for p in params if not p.ds_persist)
            out["persistent_numel"] = sum(p.ds_numel for p in params if p.ds_persist)
    unbucketed = build_teacher(teacher_cfg(folder, bucket_by_length=False))
    out["unbucketed"] = unbucketed.embed(*tokens(unbucketed, RANK_ROWS[r])).numpy()
    packed = build_teacher(teacher_cfg(folder, packing=True, max_len=16))
    out["packed"] = packed.embed(*tokens(packed, RANK_ROWS[r])).numpy()
    out["packed_on"] = packed.packing
    offloaded = build_teacher(teacher_cfg(folder, offload="cpu"))
    out["offload_cpu"] = offloaded.embed(*tokens(offloaded, RANK_ROWS[r])).numpy()

    out["hf_zero3_flag_after_load"] = is_deepspeed_zero3_enabled()
    later_hf = LlamaModel.from_pretrained(folder)  # would be built under zero.Init if the HF switch had leaked
    student_cfg = StudentConfig(image_model="vit_tiny_patch16_224", image_size=32, text_width=32, text_layers=1,
                                text_heads=2, embed_dim=16,
                                image_model_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    student = build_student(student_cfg, load_tokenizer("byte"))
    out["later_params_with_ds_id"] = sum(hasattr(p, "ds_id") for m in (later_hf, student) for p in m.parameters())
    out["later_hf_numel"] = sum(p.numel() for p in later_hf.parameters())
    return out


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """Single process, unsharded: every caption's embedding for every variant."""
    out = {}
    for name, kw in VARIANTS.items():
        t = build_teacher(teacher_cfg(tiny_folder, **kw))
        assert not t.sharded
        out[name] = t.embed(*tokens(t, range(len(CAPTIONS))))
        out["fingerprint_" + name] = t.fingerprint
    return out


@pytest.fixture(scope="module")
def sharded(tiny_folder):
    return run_ranks(_sharded_run, tiny_folder, world_size=2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero3_two_ranks_match_single_process(sharded, reference, variant):
    for r, res in enumerate(sharded):
        assert res["sharded"]
        assert_close(res["embeddings"][variant], reference[variant][RANK_ROWS[r]])
        assert res["fingerprint_" + variant] == reference["fingerprint_" + variant]
    assert len({reference["fingerprint_" + v] for v in VARIANTS}) == len(VARIANTS)


def test_each_rank_holds_only_its_shard(sharded, reference):
    total = sum(p.numel() for p in LlamaModel(LlamaConfig(**TINY_LLAMA)).parameters())
    for res in sharded:
        assert res["all_teacher_params_have_ds_id"]
        assert res["ds_numel"] == total
        # DeepSpeed pads each parameter to a multiple of the world size and keeps ceil(numel / world) per rank.
        assert res["local_numel"] == res["expected_local_numel"]
        assert total / 2 <= res["local_numel"] < total / 2 + 200
        assert res["gathered_non_persistent"] == 0
        assert res["persistent_numel"] == 5 * TINY_LLAMA["hidden_size"]  # 2 norms per layer + the final norm


def test_uneven_and_empty_batches_run_in_step(sharded, reference):
    # Rank 0: 3 chunks; rank 1: 1 chunk + 2 dummies. Second call: rank 0 2 chunks, rank 1 0 chunks + 2 dummies.
    assert [res["forwards"]["mean_last_layer"] for res in sharded] == [3, 3]
    for r, res in enumerate(sharded):
        expected = reference["mean_last_layer"][RANK_ROWS_SECOND[r]]
        assert res["second_call"].shape == (len(RANK_ROWS_SECOND[r]), TINY_LLAMA["hidden_size"])
        assert str(res["second_call"].dtype) == "float32"
        assert_close(res["second_call"], expected)


def test_models_created_after_the_teacher_are_not_partitioned(sharded):
    for res in sharded:
        assert res["hf_zero3_flag_after_load"] is False
        assert res["later_params_with_ds_id"] == 0
        assert res["later_hf_numel"] == sum(p.numel() for p in LlamaModel(LlamaConfig(**TINY_LLAMA)).parameters())


def test_bucketing_packing_and_cpu_offload_keep_embeddings(sharded, reference, tiny_folder):
    single = build_teacher(teacher_cfg(tiny_folder, max_len=16))
    short = single.embed(*tokens(single, range(len(CAPTIONS))))
    for r, res in enumerate(sharded):
        assert_close(res["unbucketed"], torch.as_tensor(res["embeddings"]["mean_last_layer"]))
        assert res["packed_on"]
        assert_close(res["packed"], short[RANK_ROWS[r]])
        assert_close(res["offload_cpu"], reference["mean_last_layer"][RANK_ROWS[r]])


# 4 ranks as 2 nodes of 2 (LOCAL_SIZE=2): ranks 0-1 and 2-3. Uneven, so ranks 1-3 run dummy forwards.
NODE_ROWS = [[0, 1, 2], [3], [4, 5], []]
NODES = [(0, 1), (0, 1), (2, 3), (2, 3)]
# Every torch.distributed collective, under both names torch has for it, and the two DeepSpeed's communication backend
# bound at start-up (its all-gathers and reduce-scatters do not look the torch functions up at call time).
COLLECTIVES = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "all_gather_coalesced",
               "_all_gather_base_coalesced", "all_gather_object", "broadcast", "broadcast_object_list", "all_reduce",
               "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "barrier")


@contextlib.contextmanager
def recorded_collectives():
    """Yields a list that gets (name, ranks of its group, elements of its first tensor) for every collective run."""
    import inspect

    import torch.distributed as td
    from deepspeed.comm import comm as ds_comm

    calls = []
    targets = [(module, name) for module in (td, td.distributed_c10d) for name in COLLECTIVES if hasattr(module, name)]
    targets += [(ds_comm.cdb, "all_gather_function"), (ds_comm.cdb, "reduce_scatter_function")]

    def recording(name, fn):
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            tensor = next((v for v in bound.values() if isinstance(v, torch.Tensor)), None)
            calls.append((name, tuple(td.get_process_group_ranks(bound.get("group") or td.group.WORLD)),
                          0 if tensor is None else tensor.numel()))
            return fn(*args, **kwargs)
        return call

    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]
    try:
        for owner, name, fn in originals:
            setattr(owner, name, recording(name, fn))
        yield calls
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def _node_sharded_run(folder):
    """`teacher.shard_within: node` on 2 nodes of 2 ranks, loaded both ways (a checkpoint, which transformers
    partitions over the world first; a random teacher, built whole), and the collectives of its embeds."""
    from kclip import dist

    r = dist.rank()
    t = build_teacher(teacher_cfg(folder, shard_within="node"))
    ids, mask = tokens(t, NODE_ROWS[r])
    # The first two forwards of a ZeRO-3 engine record its module order, which DeepSpeed checks against world rank
    # 0's with broadcasts of a few ints: recorded separately from the steady state.
    with recorded_collectives() as first_calls:
        t.embed(ids, mask)
    with recorded_collectives() as calls:
        emb = t.embed(ids, mask)
    with recorded_collectives() as embedding_calls:
        input_embeddings = t.input_embeddings()
    params = list(t.module.module.parameters())
    random = build_teacher(TeacherConfig(random_config=TINY_LLAMA, layer=1, chunk_size=2, shard_within="node"))
    return {"embeddings": emb.numpy(), "fingerprint": t.fingerprint, "forwards": t.forwards,
            "first_calls": first_calls, "calls": calls, "embedding_calls": embedding_calls,
            "input_embeddings": input_embeddings.numpy(),
            "ds_numel": sum(p.ds_numel for p in params), "local_numel": sum(p.ds_tensor.numel() for p in params),
            "expected_local_numel": sum(math.ceil(p.ds_numel / 2) for p in params),
            "partition_groups": {tuple(torch.distributed.get_process_group_ranks(p.ds_process_group)) for p in params},
            "random_embeddings": random.embed(*tokens(random, NODE_ROWS[r])).numpy(),
            "random_layers": len(random.module.module.layers)}


def test_node_sharding_keeps_the_teacher_and_its_all_gathers_inside_each_node(tiny_folder, reference):
    """4 CPU ranks as 2 nodes: each rank holds half the teacher, embeds exactly as one process does, and every
    parameter all-gather stays in its node. Crossing nodes: only the forward-count equalisation (one all-reduce of one
    integer per embed) and, in the first two forwards only, DeepSpeed's check of its module trace (a few ints)."""
    results = run_ranks(_node_sharded_run, tiny_folder, world_size=4, env={"LOCAL_SIZE": "2"})
    total = sum(p.numel() for p in LlamaModel(LlamaConfig(**TINY_LLAMA)).parameters())
    single_random = build_teacher(TeacherConfig(random_config=TINY_LLAMA, layer=1, chunk_size=2))
    random_reference = single_random.embed(*tokens(single_random, range(len(CAPTIONS))))
    embedding_matrix = LlamaModel.from_pretrained(tiny_folder).embed_tokens.weight.detach()
    for r, res in enumerate(results):
        node, world = NODES[r], (0, 1, 2, 3)
        assert res["partition_groups"] == {node}
        assert res["ds_numel"] == total and res["local_numel"] == res["expected_local_numel"]
        assert total / 2 <= res["local_numel"] < total / 2 + 100
        assert_close(res["embeddings"], reference["mean_last_layer"][NODE_ROWS[r]])
        assert res["fingerprint"] == reference["fingerprint_mean_last_layer"]  # shard_within is not part of it
        assert res["forwards"] == 4  # 2 per embed on every rank: rank 0 has 2 chunks, the others pad with dummies
        torch.testing.assert_close(torch.as_tensor(res["input_embeddings"]), embedding_matrix, atol=0, rtol=0)
        assert_close(res["random_embeddings"], random_reference[NODE_ROWS[r]])
        assert res["random_layers"] == 1

        gathers = [c for c in res["calls"] if c[1] != world]
        assert gathers and all(name == "all_gather_function" and ranks == node for name, ranks, _ in gathers)
        assert [c for c in res["calls"] if c[1] == world] == [("all_reduce", world, 1)]
        assert all(ranks == node for _, ranks, _ in res["embedding_calls"]) and res["embedding_calls"]
        first_world = [c for c in res["first_calls"] if c[1] == world]
        assert first_world.count(("all_reduce", world, 1)) == 1
        assert all(name in ("all_reduce", "broadcast") and n < 100 for name, _, n in first_world), first_world
        assert all(ranks in (node, world) for _, ranks, _ in res["first_calls"])


def _nvme_run(folder, nvme_dir):
    t = build_teacher(teacher_cfg(folder, offload="nvme", nvme_path=os.path.join(nvme_dir, str(os.getpid()))))
    from kclip import dist

    return t.embed(*tokens(t, RANK_ROWS[dist.rank()])).numpy()


@pytest.mark.slow
def test_nvme_offload_matches(tiny_folder, reference, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async_io op cannot be built here (NVMe offload needs libaio-dev)")
    for r, emb in enumerate(run_ranks(_nvme_run, tiny_folder, str(tmp_path), world_size=2, timeout=600)):
        assert_close(emb, reference["mean_last_layer"][RANK_ROWS[r]])


def test_bucketing_processes_fewer_tokens_single_process(tiny_folder):
    bucketed, padded = (build_teacher(teacher_cfg(tiny_folder, bucket_by_length=b)) for b in (True, False))
    ids, mask = tokens(bucketed, range(len(CAPTIONS)))
    torch.testing.assert_close(bucketed.embed(ids, mask), padded.embed(ids, mask), atol=1e-5, rtol=0)
    lengths = mask.sum(1)
    assert bucketed.tokens_padded == padded.tokens_padded == len(CAPTIONS) * int(lengths.max())
    assert bucketed.tokens_processed < padded.tokens_processed <= bucketed.tokens_padded
    sorted_lengths = lengths.sort(descending=True).values
    assert bucketed.tokens_processed == sum(2 * int(sorted_lengths[i]) for i in range(0, len(CAPTIONS), 2))


def test_padding_side_and_max_len(tiny_folder):
    t = build_teacher(teacher_cfg(tiny_folder))
    ids, mask = tokens(t, range(len(CAPTIONS)))
    width, lengths = ids.shape[1], mask.sum(1)
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, width - n :], left_mask[i, width - n :] = ids[i, :n], 1
    torch.testing.assert_close(pack_right(left_ids, left_mask)[0], ids)
    torch.testing.assert_close(t.embed(left_ids, left_mask), t.embed(ids, mask), atol=1e-5, rtol=0)
    short = build_teacher(teacher_cfg(tiny_folder, max_len=4))
    torch.testing.assert_close(short.embed(ids, mask), t.embed(ids[:, :4], mask[:, :4]), atol=1e-5, rtol=0)


def test_pack_rows_is_first_fit_decreasing():
    # longest first; each caption into the first row with room: 5+1 | 3+3 | 2
    assert pack_rows(torch.tensor([5, 3, 3, 2, 1]), 6) == [[0, 4], [1, 2], [3]]
    assert pack_rows(torch.tensor([4, 4]), 4) == [[0], [1]]


class TokenEcho(Teacher):
    """A Teacher whose "model" returns, per token, (its id, its position id): pooling then shows which tokens of which
    row, at which positions, entered each caption's embedding."""

    def _forward(self, ids, mask, position_ids=None):
        self.forwards += 1
        positions = torch.arange(ids.shape[1]).expand_as(ids) if position_ids is None else position_ids
        return torch.stack([ids.float(), positions.float()], dim=-1)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_rows_lay_out_each_caption_at_its_own_positions(packing, pooling):
    """The vectorised row building: every caption's tokens, at positions 0..n-1 (restarting per packed caption), pool
    into its embedding; a leading BOS is skipped by mean pooling; nothing else enters."""
    bos, pad = 1, 0
    tokenizer = type("Tok", (), {"pad_token_id": pad, "bos_token_id": bos})()
    cfg = TeacherConfig(pooling=pooling, normalize=False, max_len=12, chunk_size=3, packing=packing)
    teacher = TokenEcho(None, tokenizer, cfg, hidden_size=2, fingerprint="", sharded=False)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 13, (23,), generator=g)
    ids = torch.randint(2, 50, (23, 12), generator=g)
    ids[::2, 0] = bos
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    got = teacher.embed(ids * mask, mask)
    for c, n in enumerate(lengths.tolist()):
        first = (1 if ids[c, 0] == bos and n > 1 else 0) if pooling == "mean" else n - 1
        kept = torch.arange(first, n)
        assert got[c].tolist() == pytest.approx([float(ids[c, kept].float().mean()), float(kept.float().mean())])
    assert teacher.forwards == (math.ceil(len(pack_rows(lengths, 12)) / 3) if packing else math.ceil(23 / 3))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_rows_give_each_caption_its_single_embedding(tiny_folder, reference, variant):
    packed = build_teacher(teacher_cfg(tiny_folder, packing=True, chunk_size=64, **VARIANTS[variant]))
    assert packed.packing  # the probe found that this model honours packed position ids
    ids, mask = tokens(packed, range(len(CAPTIONS)))
    assert_close(packed.embed(ids, mask), reference[variant])
    # 132 tokens in rows of max_len=77: two rows (76 + 56 tokens), one forward, 20 padded tokens instead of 126.
    lengths = mask.sum(1)
    assert [int(lengths[row].sum()) for row in pack_rows(lengths, 77)] == [76, 56]
    assert packed.forwards == 1 and packed.tokens_processed == 2 * 76
    assert packed.tokens_padded == len(CAPTIONS) * int(lengths.max()) == 258


def test_a_model_that_ignores_packed_positions_falls_back_to_single_rows(tiny_folder, reference, caplog):
    teacher = build_teacher(teacher_cfg(tiny_folder, packing=True))
    module_forward = teacher.module.forward
    # A model whose attention ignores position ids (so captions in one row would see each other).
    teacher.module.forward = lambda position_ids=None, **kw: module_forward(**kw)
    assert teacher.check_packing() is False and not teacher.packing
    assert "using length-bucketed chunks instead" in caplog.text
    assert_close(teacher.embed(*tokens(teacher, range(len(CAPTIONS)))), reference["mean_last_layer"])


def test_random_teacher_is_seeded_and_fingerprinted():
    cfg = TeacherConfig(random_config=TINY_LLAMA, seed=3)
    a, b, c = build_teacher(cfg), build_teacher(cfg), build_teacher(TeacherConfig(random_config=TINY_LLAMA, seed=4))
    ids, mask = a.tokenize(CAPTIONS)
    torch.testing.assert_close(a.embed(ids, mask), b.embed(ids, mask))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not torch.allclose(a.embed(ids, mask), c.embed(ids, mask))
    torch.testing.assert_close(a.embed(ids, mask).norm(dim=-1), torch.ones(len(CAPTIONS)))


def test_fingerprint_tells_apart_same_sized_checkpoints_and_ignores_speed_settings(tiny_folder, tmp_path):
    torch.manual_seed(1)
    LlamaModel(LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp_path)  # same file names and sizes, other weights
    load_tokenizer("byte").save_pretrained(tmp_path)
    base = build_teacher(teacher_cfg(tiny_folder)).fingerprint
    assert build_teacher(teacher_cfg(str(tmp_path))).fingerprint != base
    assert build_teacher(teacher_cfg(tiny_folder, chunk_size=5, bucket_by_length=False)).fingerprint == base
    assert build_teacher(teacher_cfg(tiny_folder, max_len=8)).fingerprint != base


def test_ds_config_derived_values():
    model_config = LlamaConfig(**TINY_LLAMA)
    ds = teacher_ds_config(TeacherConfig(chunk_size=8), model_config, torch.bfloat16)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 8
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"],
            zero["reduce_bucket_size"]) == (int(0.9 * 64 * 64), 640, 4096)
    assert all(type(zero[k]) is int for k in ("stage3_prefetch_bucket_size", "reduce_bucket_size"))
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert not any("." in k for k in ds)  # dotted keys are silently ignored by DeepSpeed
    nvme = teacher_ds_config(TeacherConfig(offload="nvme", nvme_path="/nvme"), model_config, torch.float32)
    offload = nvme["zero_optimization"]["offload_param"]
    assert offload["device"] == "nvme" and offload["nvme_path"] == "/nvme" and offload["buffer_size"] >= 384 * 64
    cpu = teacher_ds_config(TeacherConfig(offload="cpu"), model_config, torch.float32)
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu" and not cpu["bf16"]["enabled"]


def test_clear_errors(tmp_path, monkeypatch):
    """build_teacher runs the same pre-flight as validate(): one ConfigError line naming the key."""
    with pytest.raises(ConfigError, match="teacher.path: no such file or folder"):
        build_teacher(TeacherConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="has no config.json"):
        build_teacher(TeacherConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "lla')  # an interrupted copy
    with pytest.raises(ConfigError, match="config.json is unreadable"):
        build_teacher(TeacherConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no weights"):
        build_teacher(TeacherConfig(path=str(tmp_path)))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="m.gguf is empty; download it again"):
        build_teacher(TeacherConfig(path=str(tmp_path / "m.gguf")))
    (tmp_path / "m.gguf").write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        build_teacher(TeacherConfig(path=str(tmp_path / "m.gguf")))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail as if it were not installed
    with pytest.raises(ConfigError, match="needs the `gguf` package"):
        build_teacher(TeacherConfig(path=str(tmp_path / "m.gguf")))
    with pytest.raises(ValueError, match="exactly one"):
        build_teacher(TeacherConfig())
    with pytest.raises(ValueError, match="teacher.layer"):
        build_teacher(TeacherConfig(random_config=TINY_LLAMA, layer=3))
    with pytest.raises(ValueError, match="nvme_path"):
        build_teacher(TeacherConfig(random_config=TINY_LLAMA, offload="nvme"))


def test_fetch_skips_download_when_file_is_present(tmp_path, monkeypatch):
    target = tmp_path / fetch.FILE_NAME
    with open(target, "wb") as f:
        f.truncate(fetch.FILE_SIZE)  # sparse: no disk used
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("downloaded although present"))
    assert fetch.fetch_smollm2(tmp_path) == target


def real_teacher_path() -> str:
    path = os.environ.get("KCLIP_TEACHER") or str(Path(__file__).parent.parent / "teachers" / fetch.FILE_NAME)
    if not os.path.isfile(path):
        pytest.skip(f"real small teacher not found at {path}: run `kclip fetch-teacher` or set KCLIP_TEACHER")
    return path


@pytest.mark.slow
@pytest.mark.teacher_file
@pytest.mark.parametrize("layer", [-1, 15])
def test_real_small_teacher_embeddings_carry_meaning(layer):
    # Each layer loads the GGUF anew: the teacher keeps only the decoder layers up to the pooled one.
    t = build_teacher(TeacherConfig(path=real_teacher_path(), pooling="mean", layer=layer))
    assert t.hidden_size == 576 and not t.sharded and len(t.module.layers) == layer % 31
    words = ["a dog", "a puppy", "an automobile", "a car", "a banana", "a yellow fruit"]
    e = t.embed(*t.tokenize(words))
    cos = dict(zip(((a, b) for a in words for b in words), (e @ e.T).flatten().tolist()))
    assert cos["a dog", "a puppy"] > cos["a dog", "an automobile"]
    assert cos["a car", "an automobile"] > cos["a car", "a puppy"]
    assert cos["a banana", "a yellow fruit"] > cos["a banana", "a car"]
    # Mid-layer means are not swamped by the BOS attention sink (with it, all pairs have cosine 1.000).
    assert cos["a dog", "a banana"] < 0.99


@pytest.mark.teacher_file
def test_real_small_teacher_packed_equals_single_captions():
    """SmolLM2 has a BOS token (skipped by mean pooling) and rotary positions: packing must restart both."""
    packed = build_teacher(TeacherConfig(path=real_teacher_path(), layer=4, chunk_size=64))
    assert packed.packing
    ids, mask = packed.tokenize(CAPTIONS)
    emb = packed.embed(ids, mask)
    packed.packing = False
    torch.testing.assert_close(emb, packed.embed(ids, mask), atol=1e-4, rtol=0)


def _real_sharded_run(path):
    t = build_teacher(TeacherConfig(path=path, chunk_size=2))
    local = sum(p.ds_tensor.numel() for p in t.module.module.parameters())
    total = sum(p.ds_numel for p in t.module.module.parameters())
    return t.embed(*t.tokenize(CAPTIONS[:3])).numpy(), local / total


@pytest.mark.slow
@pytest.mark.teacher_file
def test_real_small_teacher_sharded_matches_single_process():
    path = real_teacher_path()
    single = build_teacher(TeacherConfig(path=path, chunk_size=2))
    expected = single.embed(*single.tokenize(CAPTIONS[:3]))
    for emb, share in run_ranks(_real_sharded_run, path, world_size=2, timeout=600):
        torch.testing.assert_close(torch.as_tensor(emb), expected, atol=1e-4, rtol=0)
        assert 0.5 <= share < 0.501


def test_middle_layer_truncation_equals_the_full_models_hidden_state():
    """The teacher drops the layers after the pooled one; its embedding must equal pooling the full model's
    hidden_states[layer] (un-normed), for a middle layer and for the embedding layer."""
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=64)
    torch.manual_seed(0)
    full = LlamaModel(LlamaConfig(**kwargs)).eval()
    for layer in (1, 0, -2):
        teacher = build_teacher(TeacherConfig(random_config=kwargs, layer=layer, normalize=False, pooling="last"),
                                shard=False)
        teacher.module.load_state_dict(
            {k: v for k, v in full.state_dict().items() if k in teacher.module.state_dict()}, strict=True)
        assert len(teacher.module.layers) == layer % 4
        ids, mask = teacher.tokenize(["a red dog", "two cats"])
        with torch.no_grad():
            hidden = full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        expected = hidden[torch.arange(2), mask.sum(1) - 1]
        torch.testing.assert_close(teacher.embed(ids, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.teacher_file
def test_a_truncated_gguf_is_one_line_naming_the_file(tmp_path):
    data = Path(real_teacher_path()).read_bytes()
    truncated = tmp_path / "half.gguf"
    truncated.write_bytes(data[: len(data) // 2])  # an interrupted download: valid header, tensors cut off
    with pytest.raises(ConfigError, match=f"teacher.path: {truncated} cannot be read, truncated or corrupt"):
        build_teacher(TeacherConfig(path=str(truncated)))
