"""Gradient clipping by unit: the towers by their own norm, the concept heads by theirs.

DeepSpeed's `gradient_clipping` scales every gradient by one global norm. On the demo the contrastive gradient's norm
is ~13 at the start, so a clip at 1.0 divides the heads' already small gradient (beta = 0.01) by 13 as well, below
AdamW's eps: the heads barely move. Here each parameter group names its `clip_unit` and its `max_grad_norm`; an
optimizer step pre-hook clips each unit to its own bound, after DeepSpeed has reduced the gradients and before AdamW
reads them (DeepSpeed's own clipping is then off: `student_ds_config`).

The hook sees the groups the optimizer is about to step. At ZeRO stage 0 (fp32, or bf16 whose optimizer holds
partitions) that is all of them: each unit is clipped exactly by its norm over all its groups. ZeRO-1/2 step the
optimizer one group at a time, so there each group (weights with weight decay, gains and biases without) is clipped
by its own norm: the same bounds, applied to smaller units.
"""
from __future__ import annotations

import torch

from kclip import dist


def clip_units_(param_groups: list[dict], *, partitioned: bool) -> dict[str, torch.Tensor]:
    """Scale the gradients of each clip unit (the groups sharing `clip_unit`) so that their joint norm is at most
    the unit's `max_grad_norm` (0 = no bound), in place; returns each unit's norm before clipping.

    partitioned: each rank holds a disjoint slice of every group's gradient (ZeRO-1/2, DeepSpeed's bf16 optimizer),
    so the squared norms are summed over ranks (collective: every rank calls this with the same groups)."""
    units: dict[str, list[dict]] = {}
    for group in param_groups:
        units.setdefault(group["clip_unit"], []).append(group)
    norms = {}
    for unit, groups in units.items():
        grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else dist.device()
        squared = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))
        if partitioned:
            squared = dist.all_reduce_sum(squared.reshape(1)).reshape(())
        norm = squared.sqrt()
        bound = groups[0]["max_grad_norm"]
        if bound > 0 and grads:
            # torch.nn.utils.clip_grad_norm_'s rule: scale by bound / (norm + 1e-6) when that is below 1.
            torch._foreach_mul_(grads, torch.clamp(bound / (norm + 1e-6), max=1.0).to(grads[0].dtype))
        norms[unit] = norm
    return norms


def install_unit_clipping(optimizer: torch.optim.Optimizer, *, partitioned: bool) -> None:
    """Clip by unit at every step of `optimizer` (the torch optimizer DeepSpeed wraps); the last step's norms are
    kept in `optimizer.unit_grad_norms`."""

    def hook(opt, args, kwargs):
        opt.unit_grad_norms = clip_units_(opt.param_groups, partitioned=partitioned)

    optimizer.register_step_pre_hook(hook)
