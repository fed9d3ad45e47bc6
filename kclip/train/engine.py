"""The student's DeepSpeed engine: seeding, precision, the DeepSpeed config derived from the run, the optimizer, and
the engine itself (`build_engine`: what training, the tests and the benchmarks step)."""
from __future__ import annotations

import random

import numpy as np
import torch

from kclip import dist
from kclip.config import Config
from kclip.ds_config import load_template
from kclip.train.clipping import install_unit_clipping


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
        # Clipping by unit replaces DeepSpeed's global clip (kclip/train/clipping.py).
        gradient_clipping=0.0 if clips_by_unit(cfg) else cfg.optim.grad_clip,
        bf16={"enabled": use_bf16(cfg)},
    )
    return ds


def partitions_optimizer(cfg: Config) -> bool:
    """Whether DeepSpeed partitions the student's optimizer state over the ranks: ZeRO-1/2, and at stage 0 its bf16
    optimizer, which keeps the fp32 master weights partitioned as ZeRO-1 does."""
    return cfg.train.zero_stage > 0 or use_bf16(cfg)


def clips_by_unit(cfg: Config) -> bool:
    """Whether the towers and the concept heads are clipped by norms of their own instead of one global norm."""
    return cfg.optim.head_grad_clip is not None


def is_concept_head(name: str) -> bool:
    return name.startswith("concept_heads.")


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups: the towers (everything but the concept heads) and, when any optim.head_* setting is not its
    default, the concept heads, each split into weights with weight decay and gains, biases and the temperature
    without (as in CLIP). Each group carries its `lr_scale`
    (the loop sets lr = schedule x lr_scale), its eps, and its clip unit and bound (kclip/train/clipping.py)."""
    o = cfg.optim
    settings = {
        "towers": {"lr_scale": 1.0, "eps": o.eps, "max_grad_norm": o.grad_clip},
        "heads": {"lr_scale": o.head_lr_scale, "eps": o.eps if o.head_eps is None else o.head_eps,
                  "max_grad_norm": o.grad_clip if o.head_grad_clip is None else o.head_grad_clip},
    }
    # With the heads' settings at their defaults the heads stay in the towers' groups: the two groups runs have always
    # had, so that their checkpoints keep resuming (an optimizer state loads only into the same group layout).
    own_heads = o.head_lr_scale != 1.0 or o.head_eps is not None or o.head_grad_clip is not None
    members: dict[tuple[str, bool], list] = {(unit, decay): [] for unit in settings for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and "logit_scale" not in name
            members["heads" if own_heads and is_concept_head(name) else "towers", decay].append(p)
    return [{"params": params, "weight_decay": o.weight_decay if decay else 0.0, "clip_unit": unit,
             **settings[unit], "lr": o.lr * settings[unit]["lr_scale"]}
            for (unit, decay), params in members.items() if params]


# Set from the config, not restored from a checkpoint (see `keep_group_settings`).
GROUP_SETTINGS = ("lr_scale", "eps", "clip_unit", "max_grad_norm")


def keep_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> None:
    """torch's load_state_dict replaces every group's settings by the saved ones: re-apply the config's, so that a
    resume follows its own config and a checkpoint saved before a setting existed still loads."""

    def reapply(opt):
        for group, own in zip(opt.param_groups, settings):
            group.update(own)

    optimizer.register_load_state_dict_post_hook(reapply)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, clipping by unit when configured. Fused on GPU; on CPU the multi-tensor (foreach)
    form, which torch does not pick there by itself: a demo step's update in 6.7 instead of 9.3 ms."""
    o = cfg.optim
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=torch.cuda.is_available(), foreach=not torch.cuda.is_available())
    keep_group_settings(optimizer, [{k: g[k] for k in GROUP_SETTINGS} for g in groups])
    if clips_by_unit(cfg):
        install_unit_clipping(optimizer, partitioned=partitions_optimizer(cfg) and dist.world_size() > 1)
    return optimizer


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
