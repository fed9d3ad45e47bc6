"""The optimizer's parameter groups and clipping by unit (kclip/train/engine.py, kclip/train/clipping.py): the
concept heads get their own lr, eps and clipping, and a huge tower gradient no longer scales their update away."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kclip.config import load_config
from kclip.train.clipping import clip_units_
from kclip.train.engine import build_optimizer, param_groups, student_ds_config


class TowersAndHeads(nn.Module):
    """Named as KnowledgeCLIP names its parameters: a tower, the temperature and one concept head."""

    def __init__(self):
        super().__init__()
        self.student = nn.Linear(4, 4)
        self.student.logit_scale = nn.Parameter(torch.tensor([2.0]))  # 1-d: DeepSpeed broadcasts it as bytes
        self.concept_heads = nn.ModuleDict({"joint": nn.Linear(4, 3)})


def _cfg(*overrides: str):
    return load_config("smoke", ["optim.lr=0.01", "optim.weight_decay=0.1", *overrides])


def _groups_by_param(model, cfg) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in param_groups(model, cfg) for p in g["params"]}


def test_heads_get_their_own_lr_and_eps_and_keep_the_weight_decay_rules():
    model = TowersAndHeads()
    cfg = _cfg("optim.head_lr_scale=10", "optim.head_eps=1e-12", "optim.eps=1e-6")
    groups = _groups_by_param(model, cfg)
    assert set(groups) == {n for n, _ in model.named_parameters()}  # every parameter, once
    for name, group in groups.items():
        head = name.startswith("concept_heads.")
        assert group["clip_unit"] == ("heads" if head else "towers")
        assert group["lr"] == pytest.approx(0.1 if head else 0.01) and group["lr_scale"] == (10 if head else 1)
        assert group["eps"] == (1e-12 if head else 1e-6)
        # As in CLIP: weights decay, gains, biases and the temperature do not, in the heads as in the towers.
        decays = name.endswith("weight") and "logit_scale" not in name
        assert group["weight_decay"] == (0.1 if decays else 0.0), name
    # Unset, the heads' settings are the towers', in the towers' two groups: the layout of every earlier checkpoint.
    default = param_groups(model, _cfg())
    assert len(default) == 2 and {g["clip_unit"] for g in default} == {"towers"}
    for group in default:
        assert group["lr"] == 0.01 and group["eps"] == 1e-6 and group["max_grad_norm"] == 1.0


def test_clipping_by_unit_turns_deepspeeds_global_clip_off():
    assert student_ds_config(_cfg("optim.grad_clip=1.0"))["gradient_clipping"] == 1.0
    assert student_ds_config(_cfg("optim.grad_clip=1.0", "optim.head_grad_clip=5"))["gradient_clipping"] == 0.0


def _one_engine_step(*overrides: str) -> dict:
    """One DeepSpeed step (ZeRO stage 0, fp32, one rank, as the demo runs) after a loss whose gradient is 1e3 per
    entry on the tower and 1e-4 on the head (beta = 0.01 times a concept gradient of 0.01), with optim.grad_clip=1;
    returns how far the head's and the tower's weights moved, per entry."""
    from kclip.train.engine import build_engine

    torch.manual_seed(0)
    cfg = _cfg("optim.weight_decay=0", "optim.grad_clip=1.0", "train.zero_stage=0", "train.global_batch_size=1",
               *overrides)
    engine = build_engine(TowersAndHeads(), cfg)
    module = engine.module
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    x = torch.ones(1, 4)
    loss = 1e3 * (module.student(x).sum() + module.student.logit_scale.sum()) + 1e-4 * module.concept_heads["joint"](x).sum()
    engine.backward(loss)
    engine.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in module.named_parameters()}
    return {"head": moved["concept_heads.joint.weight"].flatten().tolist(),
            "tower": moved["student.weight"].flatten().tolist()}


def test_a_huge_tower_gradient_no_longer_zeroes_the_heads_update():
    from multiproc import run_ranks

    # DeepSpeed's one global clip (norm ~4.6e3): the head gradient becomes ~2e-8, below eps = 1e-6, and Adam's first
    # step lr * g / (|g| + eps) is 2% of the lr.
    (global_clip,) = run_ranks(_one_engine_step, world_size=1)
    assert max(global_clip["head"]) < 0.03 * 0.01
    assert global_clip["tower"] == pytest.approx([0.01] * 16, rel=1e-3)
    # Clipped by their own norm (under its bound): the head moves by about its lr (2 x 0.01), eps taking 1%.
    (by_unit,) = run_ranks(_one_engine_step, "optim.head_grad_clip=1.0", "optim.head_lr_scale=2", world_size=1)
    assert by_unit["head"] == pytest.approx([0.02 * 1e-4 / (1e-4 + 1e-6)] * 12, rel=1e-3)
    assert by_unit["tower"] == pytest.approx([0.01] * 16, rel=1e-3)


def test_each_unit_is_clipped_to_its_own_bound():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad, c.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]), torch.tensor([0.3, 0.4])
    groups = [{"params": [a], "clip_unit": "towers", "max_grad_norm": 1.0},
              {"params": [b], "clip_unit": "towers", "max_grad_norm": 1.0},
              {"params": [c], "clip_unit": "heads", "max_grad_norm": 1.0}]
    norms = clip_units_(groups, partitioned=False)
    assert float(norms["towers"]) == pytest.approx(5.0) and float(norms["heads"]) == pytest.approx(0.5)
    # The towers' two groups share one norm (5): both scaled by 1/5; the heads, under their bound, untouched.
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([0.0, 0.8]), atol=1e-6)
    assert torch.equal(c.grad, torch.tensor([0.3, 0.4]))
    groups[2]["max_grad_norm"] = 0.0  # 0: not clipped, whatever the norm
    c.grad = torch.tensor([30.0, 40.0])
    clip_units_(groups, partitioned=False)
    assert torch.equal(c.grad, torch.tensor([30.0, 40.0]))


def _partitioned_norm() -> dict:
    """Each of 2 ranks holds half of one group's gradient, (3, 0) and (0, 4), as ZeRO-1/2 partitions it."""
    from kclip import dist

    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 0.0]) if dist.rank() == 0 else torch.tensor([0.0, 4.0])
    norms = clip_units_([{"params": [p], "clip_unit": "towers", "max_grad_norm": 1.0}], partitioned=True)
    return {"norm": float(norms["towers"]), "grad": p.grad.tolist()}


def test_a_partitioned_unit_is_clipped_by_its_norm_over_all_ranks():
    from multiproc import run_ranks

    first, second = run_ranks(_partitioned_norm, world_size=2)
    assert first["norm"] == pytest.approx(5.0) and second["norm"] == pytest.approx(5.0)
    assert first["grad"] == pytest.approx([0.6, 0.0], abs=1e-6) and second["grad"] == pytest.approx([0.0, 0.8], abs=1e-6)


def test_loading_a_state_keeps_the_configs_group_settings():
    """torch restores each group's settings from the saved state: a checkpoint saved before `lr_scale` existed, or
    with other head settings, must not replace what this run's config says."""
    model = TowersAndHeads()
    optimizer = build_optimizer(model, _cfg("optim.head_lr_scale=10", "optim.head_eps=1e-12"))
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["lr_scale"]
        group["eps"] = 0.5
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        head = group["clip_unit"] == "heads"
        assert group["lr_scale"] == (10 if head else 1.0) and group["eps"] == (1e-12 if head else 1e-6)
