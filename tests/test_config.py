"""Config loading and validation, all before any process group: floats written `1e-4`, broken YAML reported in one
line with its position, and a range for every numeric key."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch.distributed

from kclip import dist
from kclip.cli import main
from kclip.config import Config, ConfigError, load_config
from kclip.validate import validate


@pytest.fixture(autouse=True)
def no_process_group_starts(monkeypatch):
    """Every check here runs before any process group starts: starting one fails the test. Asserted at the start, not
    by torch.distributed.is_initialized() afterwards, which depends on test order (a test file that trained in this
    process leaves its group behind, not these tests' to destroy); and a group started under a launcher environment
    of ranks that do not exist would block until its timeout instead of failing."""
    def start(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(dist, "init", start)
    monkeypatch.setattr(torch.distributed, "init_process_group", start)


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    """What validate() reads of a dataset: index.json, the count in stats.json that marks a conversion as complete,
    and the shard files' existence (no data is opened)."""
    folder = tmp_path_factory.mktemp("mds")
    (folder / "shard.00000.mds").write_bytes(b"")
    shard = {"samples": 64, "raw_data": {"basename": "shard.00000.mds"}}
    (folder / "index.json").write_text(json.dumps({"shards": [shard]}))
    (folder / "stats.json").write_text(json.dumps({"written": 64}))
    return folder


def smoke(mds: Path, *overrides: str) -> Config:
    return load_config("smoke", [f"data.train={mds}", *overrides])


def launched_as_rank_0(monkeypatch, world_size: int, local_world_size: int) -> None:
    """The environment torchrun gives rank 0, for this test only."""
    for key, value in {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": str(local_world_size), "LOCAL_SIZE": str(local_world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)


def unchecked_numeric_keys(obj, prefix: str = "") -> list[str]:
    """Numeric fields that declare neither a range nor choices."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += unchecked_numeric_keys(value, f"{prefix}{f.name}.")
        elif {t.strip() for t in f.type.split("|")} & {"int", "float"} and not {"range", "choices"} & set(f.metadata):
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_numeric_key_has_a_range():
    """A numeric field added to a config section without a range fails here rather than at some step of a run."""
    assert unchecked_numeric_keys(Config()) == []


@pytest.mark.parametrize("override, key", [
    ("train.global_batch_size=0", "train.global_batch_size"),  # was a ZeroDivisionError
    ("train.global_batch_size=-16", "train.global_batch_size"),  # was reported under concepts.k
    ("train.steps=0", "train.steps"),
    ("train.micro_batch_size=-4", "train.micro_batch_size"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),  # was silently "no accumulation"
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.seed=-1", "train.seed"),
    ("concepts.k=0", "concepts.k"),  # silently turned concept learning off
    ("concepts.k=1", "concepts.k"),
    ("concepts.k=-3", "concepts.k"),
    ("concepts.tau=0", "concepts.tau"),
    ("concepts.niter=0", "concepts.niter"),
    ("concepts.buffer_size=0", "concepts.buffer_size"),
    ("concepts.warmup_steps=-1", "concepts.warmup_steps"),
    ("concepts.recompute_every=-1", "concepts.recompute_every"),
    ("concepts.seed=2147483648", "concepts.seed"),  # faiss overflows after setup
    ("checkpoint.every=0", "checkpoint.every"),  # crashed at the first step
    ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("log.every=0", "log.every"),  # crashed at the first step
    ("eval.every=-1", "eval.every"),  # evaluated at every step
    ("eval.batch_size=0", "eval.batch_size"),
    ("optim.lr=-1e-4", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.beta1=1", "optim.beta1"),
    ("optim.beta2=-0.1", "optim.beta2"),
    ("optim.eps=0", "optim.eps"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("loss.distill_weight=-1", "loss.distill_weight"),
    ("loss.contrastive_chunk=-8", "loss.contrastive_chunk"),
    ("student.image_size=0", "student.image_size"),
    ("student.text_max_len=0", "student.text_max_len"),
    ("student.init_logit_scale=.inf", "student.init_logit_scale"),
    ("teacher.max_len=0", "teacher.max_len"),
    ("teacher.chunk_size=0", "teacher.chunk_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.num_canonical_nodes=0", "data.num_canonical_nodes"),
    ("dist.timeout_s=0", "dist.timeout_s"),
    ("dist.timeout_s=.inf", "dist.timeout_s"),
])
def test_out_of_range_value_fails_in_one_line_naming_the_key(mds, override, key):
    with pytest.raises(ConfigError) as error:
        validate(smoke(mds, override), world_size=2, cuda=False)
    message = str(error.value)
    assert message.startswith(f"{key}: must be ") and "\n" not in message, message


@pytest.mark.parametrize("override", [
    "eval.every=0",  # only at the end
    "concepts.recompute_every=0",  # fit once
    "checkpoint.keep_last=0",  # keep all
    "optim.grad_clip=0",  # no clipping
    "optim.min_lr_ratio=1",  # constant lr after warm-up
    "optim.beta1=0",
    "optim.warmup_steps=0",
    "optim.lr=0",
    "loss.contrastive_chunk=0",
    "data.num_workers=0",
    "teacher.layer=-2",  # Python indexing from the end
    "concepts.k=2",
    "concepts.seed=2147483647",
])
def test_boundary_values_with_a_meaning_are_valid(mds, override):
    validate(smoke(mds, override), world_size=2, cuda=False)


def test_floats_with_an_exponent_load_from_the_command_line_and_from_yaml(mds, tmp_path):
    cfg = smoke(mds, "optim.lr=1e-4", "optim.eps=1E-8", "concepts.tau=5e-2")
    assert (cfg.optim.lr, cfg.optim.eps, cfg.concepts.tau) == (1e-4, 1e-8, 5e-2)
    validate(cfg, world_size=1, cuda=False)
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  weight_decay: 1e-2\n"
                    "teacher:\n  random_config: {hidden_size: 48, rms_norm_eps: 1e-5}\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (5e-4, 1e-2)
    # Nested in a dict field, which goes to transformers unchecked: a string here would fail far from the config.
    assert cfg.teacher.random_config["rms_norm_eps"] == 1e-5
    with pytest.raises(ConfigError, match=r"^optim.lr: expected float, got '1e-4'$"):
        smoke(mds, "optim.lr='1e-4'")  # quoted, it is a string, as YAML says


@pytest.mark.parametrize("content, override, expected", [
    (b"train:\n  steps: 10\n  global_batch_size: 16: 3\n", None,
     "invalid YAML in {path} at line 3, column 24: mapping values are not allowed here"),
    (b"optim:\n  lr: [1e-4\n", None,
     "invalid YAML in {path} at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    (b"train:\n  steps: \xff\n", None, "invalid YAML in {path}: "),
    (None, "train.steps=[1",
     "train.steps: invalid YAML in override 'train.steps=[1' at line 1, column 15: expected ',' or ']', but got"),
], ids=["file-syntax", "file-unclosed", "file-not-utf8", "override"])
def test_broken_yaml_is_one_line_with_its_position(tmp_path, capsys, content, override, expected):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content or b"train:\n  steps: 10\n")
    argv = ["train", "--config", str(path), "--output", str(tmp_path / "run"), *([override] if override else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("kclip: error: ") and expected.format(path=path) in err, err


def test_node_sharding_needs_equal_whole_nodes_in_one_line_before_any_process_group(mds, tmp_path, capsys,
                                                                                    monkeypatch):
    node = ("teacher.shard_within=node", "train.global_batch_size=24")
    validate(smoke(mds, *node), world_size=8, local_world_size=4, cuda=False)  # 2 nodes of 4
    validate(smoke(mds, *node), world_size=4, cuda=False)  # one node: the same as world
    validate(smoke(mds, node[1]), world_size=6, local_world_size=4, cuda=False)  # world: any layout
    expected = ("teacher.shard_within: node needs equal nodes, but the world size 6 is not a multiple of the 4 ranks "
                "per node (LOCAL_WORLD_SIZE); use world")
    with pytest.raises(ConfigError) as error:
        validate(smoke(mds, *node), world_size=6, local_world_size=4, cuda=False)
    assert str(error.value) == expected
    with pytest.raises(ConfigError, match="^teacher.shard_within: node cannot be combined with teacher.offload=nvme"):
        validate(smoke(mds, *node, "teacher.offload=nvme", "teacher.nvme_path=/nvme"), world_size=1, cuda=False)
    # `kclip train` takes the ranks per node from the launcher (torchrun's LOCAL_WORLD_SIZE here).
    launched_as_rank_0(monkeypatch, world_size=6, local_world_size=4)
    assert main(["train", "--config", "smoke", "--output", str(tmp_path / "run"), f"data.train={mds}", *node]) == 2
    assert capsys.readouterr().err == f"kclip: error: {expected}\n"


# A timm convnet with BatchNorm (BatchNorm2d, 7.5k parameters at 8 channels).
BATCHNORM_TOWER = ("student.image_model=resnet10t",
                   "student.image_model_kwargs={channels: [8, 8, 8, 8], stem_width: 8}")


def test_gradient_cached_micro_batches_refuse_a_batchnorm_tower_in_one_line_before_any_process_group(
        mds, tmp_path, capsys, monkeypatch):
    """GradCache takes one loss over the step's micro-batches: exact for towers that treat samples one by one, not
    for BatchNorm (statistics per micro-batch, running statistics updated twice per micro-batch)."""
    validate(smoke(mds, *BATCHNORM_TOWER), world_size=2, cuda=False)  # one micro-batch per step
    validate(smoke(mds, "train.micro_batch_size=4"), world_size=2, cuda=False)  # the smoke ViT: LayerNorm only
    expected = ("train.micro_batch_size: 4 splits the per-rank batch of 8 into gradient-cached micro-batches, which "
                "are exact only without batch statistics, but student.image_model resnet10t has BatchNorm2d "
                "(conv1.1); leave train.micro_batch_size unset (one micro-batch per step) or use a tower without batch "
                "statistics")
    with pytest.raises(ConfigError) as error:
        validate(smoke(mds, *BATCHNORM_TOWER, "train.micro_batch_size=4"), world_size=2, cuda=False)
    assert str(error.value) == expected
    with pytest.raises(ConfigError, match=r"^student.image_model: timm cannot build 'no_such_net' .*Unknown model"):
        validate(smoke(mds, "student.image_model=no_such_net", "train.micro_batch_size=4"), world_size=2, cuda=False)
    launched_as_rank_0(monkeypatch, world_size=2, local_world_size=2)
    assert main(["train", "--config", "smoke", "--output", str(tmp_path / "run"), f"data.train={mds}",
                 *BATCHNORM_TOWER, "train.micro_batch_size=4"]) == 2
    assert capsys.readouterr().err == f"kclip: error: {expected}\n"
