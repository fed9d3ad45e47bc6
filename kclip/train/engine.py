"""The student's DeepSpeed engine: seeding, precision, the DeepSpeed config derived from the run, the optimizer."""
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


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; as in CLIP, gains, biases and the temperature get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=torch.cuda.is_available())


