"""The student's DeepSpeed engine: seeding, precision, the DeepSpeed config derived from the run, the optimizer, and
the engine itself (`build_engine`: what training, the tests and the benchmarks step)."""
from __future__ import annotations

import random

import numpy as np
import torch

from kclip import dist
from kclip.config import Config
from kclip.ds_config import load_template


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_bf16(cfg: Config) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())


def student_ds_config(cfg: Config) -> dict:
    """The student's DeepSpeed config: the ZeRO template plus every value derived from the run."""
    world = dist.world_size()
    per_rank = cfg.train.global_batch_size // world
    micro = cfg.train.micro_batch_size or per_rank
    ds = load_template(f"student_zero{cfg.train.zero_stage}")
    ds.update(
        train_batch_size=cfg.train.global_batch_size,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=per_rank // micro,
        gradient_clipping=cfg.optim.grad_clip,
        bf16={"enabled": use_bf16(cfg)},
    )
    return ds


def partitions_optimizer(cfg: Config) -> bool:
    """Whether DeepSpeed partitions the student's optimizer state over the ranks: ZeRO-1/2, and at stage 0 its bf16
    optimizer, which keeps the fp32 master weights partitioned as ZeRO-1 does."""
    return cfg.train.zero_stage > 0 or use_bf16(cfg)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; as in CLIP, gains, biases and the temperature get no weight decay. Fused on GPU; on CPU the multi-tensor
    (foreach) form, which torch does not pick there by itself: a demo step's update in 6.7 instead of 9.3 ms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=torch.cuda.is_available(), foreach=not torch.cuda.is_available())




def build_engine(model: torch.nn.Module, cfg: Config, *, load_universal: bool = False):
    """The DeepSpeed engine around `model` with kclip's optimizer (collective: it broadcasts rank 0's weights).
    `load_universal`: its next load_checkpoint reads a universal checkpoint (a resume on another world size)."""
    import deepspeed

    ds_config = student_ds_config(cfg)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds_config)
    if cfg.train.zero_stage == 0 and dist.world_size() == 1:
        # Without ZeRO, DeepSpeed all-reduces every gradient through a flattened copy after each backward; on one
        # rank that average is the identity, ~1% of a demo step on a CPU (BENCHMARKS.md, kclip vs open_clip).
        engine.enable_backward_allreduce = False
    return engine
