"""The training step (`kclip.train.task.KnowledgeCLIPTask`) called directly on DeepSpeed engines in spawned ranks: GradCache
accumulation gives one big batch's loss and update with every loss term on, ZeRO stage 0 updates as ZeRO-1 does, and a
non-finite micro-batch skips exactly its optimizer step without misaligning DeepSpeed's accumulation window, also
through the training loop."""
from __future__ import annotations

import math

import pytest
import torch
from multiproc import run_ranks
from shapes import make_shapes_mds

PER_RANK = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=96)


def _setup(data: str, run_dir: str, micro: int, *extra: str):
    from kclip import dist
    from kclip.config import load_config
    from kclip.train.state import setup

    # eps=1 makes Adam's first update lr * g / (|g| + 1): it follows the gradient's size, where the default eps would
    # give lr * sign(g) and hide a wrong scaling. No clipping and no decay: the update is the gradient's alone.
    cfg = load_config("smoke", [f"data.train={data}", f"train.global_batch_size={PER_RANK * dist.world_size()}",
                                f"train.micro_batch_size={micro}", "data.shuffle=false", "optim.eps=1.0",
                                "optim.grad_clip=0", "optim.weight_decay=0", "optim.lr=0.1", *extra])
    return setup(cfg, run_dir, load_universal=False)


def _split(batch: dict, micro: int) -> list[dict]:
    keys = [k for k, v in batch.items() if isinstance(v, (torch.Tensor, list))]
    return [{k: batch[k][i : i + micro] for k in keys} for i in range(0, PER_RANK, micro)]


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _accumulation_matches_the_big_batch(data: str, run_dir: str) -> dict:
    """Two steps from the same initial weights on the same rows: one batch of 16 against 4 micro-batches of 4, the
    concept bank fitted once after the first step so that the second has all three terms. Returns the worst relative
    differences of the losses and of the parameter updates."""
    from kclip import dist

    full = _setup(data, f"{run_dir}/full", PER_RANK)
    batches = [b for _, b in zip(range(2), full.loader)]
    runs = {"full": (full, PER_RANK), "accum": (_setup(data, f"{run_dir}/accum", 4), 4)}
    losses, updates = {}, {}
    for name, (run, micro) in runs.items():
        assert run.engine.gradient_accumulation_steps() == PER_RANK // micro
        before = _params(run.engine)
        losses[name], updates[name] = [], []
        for step, batch in enumerate(batches):
            result = run.task.step(_split(batch, micro))
            assert result.finite
            losses[name].append({"total": result.total, **result.terms})
            after = _params(run.engine)
            updates[name].append({n: after[n] - before[n] for n in after})
            before = after
            # One fit, which both runs use: k-means is discontinuous in its input, and the teacher embeddings it
            # clusters differ in their last bit between a batch of 16 and batches of 4 on some CPUs' kernels.
            if step == 0 and name == "full":
                run.task.bank.fit(run.task.buffer.tensor(), mean=run.task.stats.mean)
                bank = run.task.bank.state_dict()
            elif step == 0:
                run.task.bank.load_state_dict(bank)
        assert run.engine.global_steps == 2
    worst_loss = max(abs(float(a[k] - b[k])) / max(abs(float(a[k])), 1e-6)
                     for a, b in zip(losses["full"], losses["accum"]) for k in a)
    # Per parameter, relative to its own update; not for the few whose gradient is zero in exact arithmetic (an
    # attention key's bias: softmax ignores a shift common to all keys), whose updates are rounding noise (~1e-9).
    worst_update = max(float((updates["accum"][s][n] - u).norm() / u.norm())
                       for s in range(2) for n, u in updates["full"][s].items() if u.norm() > 1e-6)
    terms = sorted(losses["accum"][1])
    frozen = [n for n, u in updates["full"][1].items() if float(u.abs().max()) == 0.0]
    return {"loss": worst_loss, "update": worst_update, "terms": terms, "frozen": frozen, "rank": dist.rank()}


@pytest.mark.parametrize("world_size", [1, 2])
def test_grad_cache_accumulation_equals_one_big_batch(shapes, tmp_path, world_size):
    results = run_ranks(_accumulation_matches_the_big_batch, str(shapes), str(tmp_path), world_size=world_size)
    for r in results:
        assert {"contrastive", "distill", "concept"} <= set(r["terms"]), r
        assert not r["frozen"], r  # every parameter got a gradient, so every update was compared
        assert r["loss"] < 1e-5 and r["update"] < 1e-4, r


def _zero_stages_agree(data: str, run_dir: str) -> dict:
    """Two steps of ZeRO-1 (one batch of 16 per rank) against ZeRO stage 0, with that batch and as 4 micro-batches of 4:
    worst relative differences of the losses and the parameter updates, and whether stage 0 all-reduced."""
    runs = {"zero1": _setup(data, f"{run_dir}/zero1", PER_RANK),
            "zero0": _setup(data, f"{run_dir}/zero0", PER_RANK, "train.zero_stage=0"),
            "zero0_accum": _setup(data, f"{run_dir}/zero0_accum", 4, "train.zero_stage=0")}
    batches = [b for _, b in zip(range(2), runs["zero1"].loader)]
    losses, updates = {}, {}
    for name, run in runs.items():
        micro = PER_RANK // run.engine.gradient_accumulation_steps()
        before, losses[name], updates[name] = _params(run.engine), [], []
        for batch in batches:
            losses[name].append(run.task.step(_split(batch, micro)).total)
            after = _params(run.engine)
            updates[name].append({n: after[n] - before[n] for n in after})
            before = after
    ref = "zero1"
    worst_loss = max(abs(float(a - b)) / abs(float(a)) for name in runs for a, b in zip(losses[ref], losses[name]))
    worst_update = max(float((updates[name][s][n] - u).norm() / u.norm())
                       for name in runs for s in range(2) for n, u in updates[ref][s].items() if u.norm() > 1e-6)
    return {"loss": worst_loss, "update": worst_update,
            "allreduce": runs["zero0"].engine.enable_backward_allreduce}


@pytest.mark.parametrize("world_size", [1, 2])
def test_zero_stage_0_updates_as_zero_1_does(shapes, tmp_path, world_size):
    for r in run_ranks(_zero_stages_agree, str(shapes), str(tmp_path), world_size=world_size):
        assert r["loss"] < 1e-5 and r["update"] < 1e-4, r
        # On one rank the average over ranks is the identity, and the engine skips it.
        assert r["allreduce"] == (world_size > 1), r


def _nan_micro_batch_skips_its_step(data: str, run_dir: str) -> dict:
    """Three steps of 4 micro-batches; in the second, micro-batch 3's images are NaN."""
    run = _setup(data, run_dir, 4)
    engine, finite, unchanged = run.engine, [], []
    micro_batches = iter(run.loader)  # batches of the micro size
    for step in range(3):
        parts = [next(micro_batches) for _ in range(4)]
        if step == 1:
            parts[2]["pixels"] = torch.full_like(parts[2]["pixels"], math.nan)
        before = _params(engine)
        finite.append(run.task.step(parts).finite)
        unchanged.append(all(torch.equal(p, before[n]) for n, p in _params(engine).items()))
    return {"finite": finite, "unchanged": unchanged, "global_steps": engine.global_steps,
            "micro_steps": engine.micro_steps}


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_nan_micro_batch_skips_exactly_its_optimizer_step(shapes, tmp_path, world_size):
    for r in run_ranks(_nan_micro_batch_skips_its_step, str(shapes), str(tmp_path), world_size=world_size):
        assert r["finite"] == [True, False, True] and r["unchanged"] == [False, True, False], r
        # DeepSpeed saw whole windows only: 2 updates from 8 micro-steps, its boundary still at every 4th.
        assert r["global_steps"] == 2 and r["micro_steps"] == 8, r


def _train_with_a_nan_micro_batch(data: str, run_dir: str) -> dict:
    """`kclip train`'s loop (in this rank), 4 steps of 4 micro-batches, micro-batch 3 of step 2 NaN; records DeepSpeed's
    counters after every step."""
    from kclip.config import load_config
    from kclip.train.loop import train
    from kclip.train.task import KnowledgeCLIPTask

    original, seen = KnowledgeCLIPTask.step, []

    def step(self, batches, targets=None):
        if len(seen) == 1:
            batches[2] = {**batches[2], "pixels": torch.full_like(batches[2]["pixels"], math.nan)}
        result = original(self, batches, targets)
        seen.append((self.engine.global_steps, self.engine.micro_steps))
        return result

    KnowledgeCLIPTask.step = step
    cfg = load_config("smoke", [f"data.train={data}", "train.micro_batch_size=4", "train.steps=4", "log.every=1",
                                "log.tensorboard=false"])
    out = train(cfg, run_dir)
    return {"counters": out["counters"], "seen": seen}


def test_the_loop_counts_a_nan_micro_batch_as_one_skipped_step(shapes, tmp_path):
    from kclip.train.metrics import read_metrics

    (r,) = run_ranks(_train_with_a_nan_micro_batch, str(shapes), str(tmp_path / "run"), world_size=1)
    assert r["counters"]["skipped_nonfinite"] == 1, r
    # engine.global_steps = steps - skipped after every step, and every window starts on DeepSpeed's boundary.
    assert r["seen"] == [(1, 4), (1, 4), (2, 8), (3, 12)], r
    # The skipped step's line has its count and no loss (a log window averages finite steps only).
    rows = [row for row in read_metrics(tmp_path / "run") if "count/skipped_nonfinite" in row]
    assert [(row["step"], row["count/skipped_nonfinite"], "loss/total" in row) for row in rows] == [
        (1, 0, True), (2, 1, False), (3, 1, True), (4, 1, True)], rows
