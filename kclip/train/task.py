"""One Knowledge-CLIP optimizer step as one object (after open_clip's task/distill_task.py).

`KnowledgeCLIPTask` owns everything a step needs besides the student engine: the frozen teacher and its cache, the
running teacher statistics, the concept bank and its embedding buffer, and the loss. The trainer, the tests and the
benchmarks all reach the loss through it (`loss`: the model's output dict and the targets, one contract).

`step(micro_batches)` runs one optimizer step over this rank's micro-batches:

- one micro-batch: forward, loss, one finiteness decision agreed across ranks, backward, engine.step;
- k > 1 micro-batches, GradCache (Gao et al. 2021; TinyCLIP distils through it): (1) every micro-batch's student
  outputs without grad; (2) the loss over the whole step's batch on leaf copies of them (the loss functions gather
  across ranks themselves), one finiteness decision, d loss / d outputs; (3) each micro-batch again with grad,
  backpropagating sum(output * its slice of d loss / d output). The update is one big batch's: the contrastive and the
  batch-level distillation terms see the global batch instead of a micro-batch (cc3m config with micro 16 on 64 GPUs:
  4,095 negatives per sample instead of 1,023). Cost: one extra student forward per micro-batch; activation memory
  stays one micro-batch's.

A non-finite step is decided before any backward, so a skipped step calls neither engine.backward nor engine.step:
DeepSpeed's accumulation window stays aligned (its boundary comes from its own micro-step counter, which only
engine.step advances) and engine.global_steps counts the updates applied, i.e. the loop's steps minus
count/skipped_nonfinite. The loop's step still advances: the schedule, the sample order and the checkpoint tags
follow the batches consumed, so a resumed run replays the same steps.

Teacher statistics and the concept buffer are updated once per step, from the step's whole batch gathered over ranks
in rank order (the order one big batch has), before any target is computed: every micro-batch's targets then come from
the same statistics, and the whitener refreshes at the same sample counts as with one big batch. They describe the
data seen, so they are updated also when the step turns out non-finite.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from kclip import dist
from kclip.concepts.bank import ConceptBank
from kclip.concepts.buffer import EmbeddingBuffer
from kclip.config import Config
from kclip.losses import KnowledgeCLIPLoss
from kclip.models.student import clamp_logit_scale_
from kclip.teacher.cache import TeacherCache, embed_cached
from kclip.teacher.stats import TeacherStats, normalized_target
from kclip.train import checkpoint


class Timer:
    """Wall-clock milliseconds per phase. On GPU it synchronises so that asynchronous kernels are attributed to the
    phase that launched them (honest numbers cost a little overlap)."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ms[name] = self.ms.get(name, 0.0) + 1000 * (time.perf_counter() - start)

    def pop(self, per: int) -> dict[str, float]:
        """Milliseconds per unit (optimizer step) since the last pop."""
        out, self.ms = {k: v / max(1, per) for k, v in self.ms.items()}, {}
        return out


def all_finite(total: torch.Tensor) -> bool:
    """Collective: True on every rank only if the loss is finite on every rank."""
    flag = torch.tensor([float(torch.isfinite(total.detach()).all())], device=total.device)
    return dist.all_reduce_sum(flag).item() == dist.world_size()


def concept_fit_due(step: int, cfg: Config) -> bool:
    """After step `step` (0-based) completes: the first fit ends the warm-up, then every `recompute_every` steps."""
    done = step + 1
    c = cfg.concepts
    if done == c.warmup_steps:
        return True
    return c.recompute_every > 0 and done > c.warmup_steps and (done - c.warmup_steps) % c.recompute_every == 0


@dataclass
class StepResult:
    total: torch.Tensor  # the step's loss over the global batch, detached
    terms: dict[str, torch.Tensor]  # detached, as KnowledgeCLIPLoss returns them
    finite: bool  # False: no update was applied (agreed across ranks)
    logit_scale: torch.Tensor
    samples: int  # rows of the step over all ranks


class KnowledgeCLIPTask:
    """The step of `engine` (a DeepSpeed engine around KnowledgeCLIP). Without a teacher (plain CLIP, or a benchmark
    that supplies its own targets) there are no statistics, concept bank or buffer, and `targets` returns {}."""

    def __init__(self, cfg: Config, engine, *, teacher=None, cache: TeacherCache | None = None):
        self.cfg, self.engine, self.teacher, self.cache = cfg, engine, teacher, cache
        self.timer = Timer()  # phase times; the loop adds data_ms and pops them per log line
        self.loss_fn = KnowledgeCLIPLoss(cfg.loss)
        self.stats = self.bank = self.buffer = None
        if teacher is not None:
            self.stats = TeacherStats(teacher.hidden_size, cfg.loss.distill_target)
            if cfg.loss.concept_weight > 0:
                c = cfg.concepts
                self.bank = ConceptBank(c.k, teacher.hidden_size, niter=c.niter, seed=c.seed,
                                        warm_start=c.warm_start, center=c.center, backend=c.backend)
                self.buffer = EmbeddingBuffer(c.buffer_size)

    def forward(self, batch: dict) -> dict:
        """The student's outputs for one micro-batch (with grad unless called under no_grad)."""
        device = dist.device()
        return self.engine(batch["pixels"].to(device), batch["input_ids"].to(device),
                           batch["attention_mask"].to(device))

    def loss(self, out: dict, targets: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, terms) for the model's output dict and `targets` (keys `teacher_target`, `soft_labels`, as far
        as the run has them): the one place where model outputs become loss inputs."""
        return self.loss_fn(image_emb=out["image_emb"], text_emb=out["text_emb"], logit_scale=out["logit_scale"],
                            distill_pred=out.get("distill_pred"), concept_logits=out.get("concept_logits"), **targets)

    def backward(self, total: torch.Tensor) -> None:
        self.engine.backward(total)

    def optimizer_step(self) -> None:
        """engine.step; at the window's boundary DeepSpeed applies the update, after which the temperature is
        clamped in place (a no-op inside the window, where the parameter does not change)."""
        self.engine.step()
        clamp_logit_scale_(self.engine.module.student.logit_scale, self.cfg.student.max_logit_scale)

    def targets(self, batches: list[dict]) -> dict:
        """Teacher targets (and, once the concept bank is fitted, soft labels) for the step's rows: this rank's
        micro-batches in order. Collective (teacher forward, one all-gather). Updates the statistics and the buffer."""
        if self.teacher is None:
            return {}
        device = dist.device()
        with self.timer("teacher_ms"):
            emb = torch.cat([embed_cached(self.teacher, self.cache, b).to(device) for b in batches])
        # Every rank adds the same gathered batch, so the statistics stay identical without another collective.
        self.stats.update(dist.all_gather_rows(emb))
        out = {"teacher_target": normalized_target(self.stats, emb)}
        if self.bank is not None:
            self.buffer.add(emb)
            if self.bank.fitted:
                out["soft_labels"] = self.bank.soft_labels(emb, self.cfg.concepts.tau)
        return out

    def step(self, batches: list[dict], targets: dict | None = None) -> StepResult:
        """One optimizer step over this rank's micro-batches (as many as the engine accumulates). Collective.
        `targets` for the step's rows come from the teacher (`targets`) unless given (benchmarks give random ones)."""
        if len(batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"{len(batches)} micro-batches for an engine that accumulates "
                             f"{self.engine.gradient_accumulation_steps()}")
        if targets is None:
            targets = self.targets(batches)
        with self.timer("student_ms"):
            if len(batches) == 1:
                out = self.forward(batches[0])
                total, terms = self.loss(out, targets)
                # All ranks must take the same branch, or the gradient all-reduce would hang: agree on finiteness.
                finite = all_finite(total)
                if finite:
                    self.backward(total)
                    self.optimizer_step()
            else:
                total, terms, finite, out = self._grad_cache_step(batches, targets)
        return StepResult(total.detach(), terms, finite, out["logit_scale"].detach(),
                          sum(b["pixels"].shape[0] for b in batches) * dist.world_size())

    def _grad_cache_step(self, batches: list[dict], targets: dict):
        # (1) Outputs without grad. The RNG state before each forward is kept so that the re-run in (3) draws the
        # same randomness (drop path, if a config enables it) and computes the outputs the loss was taken of.
        # The logit scale is one value for the whole step, not a row per sample: it is kept apart, enters the loss
        # once, and its gradient goes back through micro-batch 0 only.
        rng, rows, spec = [], [], None
        with torch.no_grad():
            for batch in batches:
                rng.append(checkpoint.rng_state())
                out = self.forward(batch)
                scale = out.pop("logit_scale")
                leaves, spec = tree_flatten(out)
                rows.append(leaves)
        # (2) The loss over the step's batch, on leaves that collect d loss / d outputs.
        leaves = [torch.cat(parts).requires_grad_() for parts in zip(*rows)]
        scale = scale.detach().requires_grad_()
        out = {**tree_unflatten(leaves, spec), "logit_scale": scale}
        total, terms = self.loss(out, targets)
        finite = all_finite(total)
        if not finite:
            return total, terms, finite, out
        total.backward()  # collective where the loss gathered with grad; stops at the leaves
        sizes = [b["pixels"].shape[0] for b in batches]
        grads = [None if leaf.grad is None else leaf.grad.split(sizes) for leaf in leaves]
        # (3) Each micro-batch again with grad. d(sum(output * g))/d params = g . d output/d params, so the
        # micro-batches' backwards sum to the big batch's gradient; g already carries the loss's 1/N, so DeepSpeed's
        # own division by the accumulation steps must not apply (scale_wrt_gas=False).
        for j, batch in enumerate(batches):
            checkpoint.set_rng_state(rng[j])
            again = self.forward(batch)
            again_scale = again.pop("logit_scale")
            outputs, _ = tree_flatten(again)
            surrogate = sum((o * g[j]).sum() for o, g in zip(outputs, grads) if g is not None)
            if j == 0 and scale.grad is not None:
                surrogate = surrogate + (again_scale * scale.grad).sum()
            self.engine.backward(surrogate, scale_wrt_gas=False)
            self.optimizer_step()  # DeepSpeed counts micro-steps here and updates at the window's last one
        return total, terms, finite, out

    def refit_concepts_if_due(self, step: int) -> dict | None:
        """After step `step` (0-based): re-fit the concept bank from the buffer when the schedule says so (collective);
        returns the fit's statistics, or None."""
        if self.bank is None or not concept_fit_due(step, self.cfg):
            return None
        with self.timer("kmeans_ms"):
            return self.bank.fit(self.buffer.tensor(), mean=self.stats.mean)
