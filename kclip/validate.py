"""Checks that need no process group: run in the launching process so a bad config fails in seconds, with one line
naming the key, instead of after every rank has started (or, worse, as a hang)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch

from kclip.config import Config, ConfigError
from kclip.losses import DISTILL_KINDS
from kclip.models.heads import CONCEPT_HEAD_KINDS
from kclip.teacher_stats import TARGETS

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def mds_num_samples(folder: str) -> int:
    """Samples in an MDS dataset, read from its index.json (no data is opened)."""
    index = Path(folder) / "index.json"
    shards = json.loads(index.read_text())["shards"]
    return sum(s["samples"] for s in shards)


def _check_mds(key: str, folder: str | None, required: bool) -> int | None:
    if folder is None:
        if required:
            raise ConfigError(f"{key}: required (an MDS folder written by `kclip prepare`)")
        return None
    if not (Path(folder) / "index.json").is_file():
        raise ConfigError(f"{key}: {folder} is not an MDS dataset (no index.json); build it with `kclip prepare`")
    index = json.loads((Path(folder) / "index.json").read_text())
    missing = [s["raw_data"]["basename"] for s in index["shards"] if not (Path(folder) / s["raw_data"]["basename"]).exists()
               and not (s.get("zip_data") and (Path(folder) / s["zip_data"]["basename"]).exists())]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} shard(s) listed in index.json are missing, e.g. {missing[0]}")
    return mds_num_samples(folder)


def _check_teacher_path(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"teacher.path: no such file or folder {path}")
    if os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"teacher.path: {path} has no config.json (expected a Hugging Face model folder or a .gguf file)")
        if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in Path(path).iterdir()):
            raise ConfigError(f"teacher.path: {path} holds no weights (*.safetensors or *.bin)")
    elif not path.endswith(".gguf"):
        raise ConfigError(f"teacher.path: {path} is a file but not .gguf")


def choices(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: finite, from `low` to `high`, each end included unless marked open."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "finite"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


FINITE = Range()
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
# faiss takes its seed as a C int, the narrowest of the seeds' consumers (numpy refuses negative ones).
SEED = Range(0, 2**31 - 1)

# Every int and float key of the config (tests/test_config.py keeps this complete), checked before any other rule
# so that no later arithmetic (batch divisions, `step % every`) sees a nonsensical value. Only what the config
# alone can tell: bounds that need the data or the model are checked where those are known.
NUMERIC_RANGES: dict[str, Range] = {
    "student.image_size": AT_LEAST_1,
    "student.text_width": AT_LEAST_1,
    "student.text_layers": AT_LEAST_1,
    "student.text_heads": AT_LEAST_1,
    "student.text_max_len": AT_LEAST_1,
    "student.embed_dim": AT_LEAST_1,
    "student.init_logit_scale": FINITE,  # log of the logit multiplier: any real number; clamped by the next key
    "student.max_logit_scale": FINITE,
    "student.distill_hidden": AT_LEAST_1,
    "student.concept_hidden": AT_LEAST_1,
    "teacher.layer": FINITE,  # negative counts from the end; its bound needs the model (checked when it loads)
    "teacher.max_len": AT_LEAST_1,
    "teacher.chunk_size": AT_LEAST_1,
    "teacher.seed": SEED,
    "loss.distill_weight": NON_NEGATIVE,  # 0 turns the term off
    "loss.concept_weight": NON_NEGATIVE,
    "loss.contrastive_weight": NON_NEGATIVE,
    "loss.contrastive_chunk": NON_NEGATIVE,  # 0 = not tiled
    "loss.distill_tau": POSITIVE,
    "concepts.k": Range(2),  # one concept would make every soft label 1 and the concept loss constant
    "concepts.tau": POSITIVE,
    "concepts.niter": AT_LEAST_1,
    "concepts.buffer_size": AT_LEAST_1,
    "concepts.warmup_steps": NON_NEGATIVE,  # >= 1 with concept learning on: checked with the other concept rules
    "concepts.recompute_every": NON_NEGATIVE,  # 0 = fit once
    "concepts.seed": SEED,
    "data.num_workers": NON_NEGATIVE,  # 0 = load in the training process
    "data.num_canonical_nodes": AT_LEAST_1,
    "optim.lr": NON_NEGATIVE,  # 0 freezes the weights: a choice (e.g. to time the data path), not a crash
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": Range(0, 1, high_open=True),  # Adam's moment decays: 1 would never forget the first gradient
    "optim.beta2": Range(0, 1, high_open=True),
    "optim.eps": POSITIVE,  # divides by sqrt(v) + eps
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.min_lr_ratio": Range(0, 1),  # the cosine ends at lr * min_lr_ratio
    "optim.grad_clip": NON_NEGATIVE,  # 0 = no clipping (DeepSpeed's convention)
    "train.steps": AT_LEAST_1,
    "train.global_batch_size": AT_LEAST_1,
    "train.micro_batch_size": AT_LEAST_1,  # None (unset) = the per-rank batch; 0 would silently mean the same
    "train.seed": SEED,
    "train.max_bad_steps": AT_LEAST_1,
    "log.every": AT_LEAST_1,
    "checkpoint.every": AT_LEAST_1,
    "checkpoint.keep_last": NON_NEGATIVE,  # 0 = keep every checkpoint
    "eval.every": NON_NEGATIVE,  # 0 = only at the end
    "eval.batch_size": AT_LEAST_1,
    "dist.timeout_s": POSITIVE,
}


def check_ranges(cfg: Config) -> None:
    """Raise ConfigError naming the first numeric key outside its range in NUMERIC_RANGES."""
    for key, valid in NUMERIC_RANGES.items():
        value = reduce(getattr, key.split("."), cfg)
        if value is not None and value not in valid:
            raise ConfigError(f"{key}: must be {valid}, got {value!r}")


def validate(cfg: Config, world_size: int, *, cuda: bool | None = None) -> None:
    """Raise ConfigError for the first impossible setting. `world_size` is the number of ranks the run will have."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    t, lo, c = cfg.train, cfg.loss, cfg.concepts
    check_ranges(cfg)
    if t.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by the world size {world_size}")
    per_rank = t.global_batch_size // world_size
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {per_rank}")
    choices("train.zero_stage", t.zero_stage, (1, 2))
    choices("train.precision", t.precision, ("auto", "fp32", "bf16"))
    if t.precision == "bf16" and not (cuda and torch.cuda.is_bf16_supported()):
        raise ConfigError("train.precision: bf16 needs a CUDA device with bf16 support; use auto or fp32 here")
    choices("teacher.dtype", cfg.teacher.dtype, ("auto", "fp32", "bf16"))
    if cfg.teacher.dtype == "bf16" and not cuda:
        raise ConfigError("teacher.dtype: bf16 teacher needs a CUDA device; use auto or fp32 here")
    choices("loss.distill_kind", lo.distill_kind, DISTILL_KINDS)
    choices("loss.distill_target", lo.distill_target, TARGETS)
    if lo.contrastive_weight == 0 and not cfg.needs_teacher:
        raise ConfigError("loss: all three weights are 0; nothing would be trained")
    choices("teacher.pooling", cfg.teacher.pooling, ("mean", "last"))
    choices("teacher.offload", cfg.teacher.offload, ("none", "cpu", "nvme"))
    if cfg.teacher.offload == "nvme" and not cfg.teacher.nvme_path:
        raise ConfigError("teacher.nvme_path: required when teacher.offload=nvme")
    for head in cfg.student.concept_heads:
        choices("student.concept_heads", head, CONCEPT_HEAD_KINDS)
    if cfg.needs_teacher:
        if not cfg.teacher.path and not cfg.teacher.random_config:
            raise ConfigError("teacher.path: required when loss.distill_weight or loss.concept_weight > 0")
        if cfg.teacher.path:
            _check_teacher_path(cfg.teacher.path)
    if cfg.student.tokenizer == "teacher" and not cfg.teacher.path:
        raise ConfigError("student.tokenizer: 'teacher' needs teacher.path")
    choices("student.token_init", cfg.student.token_init, ("random", "teacher"))
    if cfg.student.token_init == "teacher":
        if cfg.student.hf_clip:
            raise ConfigError("student.token_init: 'teacher' initialises the timm + CLIP text towers; student.hf_clip "
                              "brings its own pretrained embeddings")
        if cfg.student.tokenizer != "teacher":
            raise ConfigError("student.token_init: 'teacher' needs student.tokenizer=teacher (the embedding rows are "
                              "the teacher's tokens)")
        if not cfg.needs_teacher:
            raise ConfigError("student.token_init: 'teacher' needs the teacher loaded (loss.distill_weight or "
                              "loss.concept_weight > 0)")
    if cfg.student.freeze_token_embeddings and cfg.student.token_init != "teacher":
        raise ConfigError("student.freeze_token_embeddings: only with student.token_init=teacher (frozen random "
                          "embeddings would never learn anything)")
    if cfg.student.hf_clip and not os.path.isdir(cfg.student.hf_clip):
        raise ConfigError(f"student.hf_clip: no such folder {cfg.student.hf_clip}")
    n_train = _check_mds("data.train", cfg.data.train, required=True)
    _check_mds("data.val", cfg.data.val, required=False)
    if n_train < t.global_batch_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} exceeds the {n_train} training samples")
    if lo.concept_weight > 0:
        if c.warmup_steps < 1:
            raise ConfigError("concepts.warmup_steps: must be >= 1 (the first fit needs teacher embeddings)")
        # What the first fit will see: warm-up samples, bounded by the buffers and by the dataset itself.
        first_fit = min(c.warmup_steps * t.global_batch_size, c.buffer_size * world_size, n_train)
        if c.k > first_fit:
            raise ConfigError(
                f"concepts.k: {c.k} exceeds the {first_fit} teacher embeddings available for the first fit "
                f"(warmup_steps x global batch, buffer_size x ranks, dataset size)")
