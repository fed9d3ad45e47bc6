"""The Knowledge-CLIP training loop, top to bottom.

Per optimizer step:  the step's micro-batches -> `KnowledgeCLIPTask.step` (task.py): the frozen ZeRO-3 teacher
                     embeds the captions (no grad, a collective) -> student forward -> contrastive (globally gathered)
                     + distillation + concept losses over the whole step's batch -> backward / step.
Every `concepts.recompute_every` steps after a warm-up, the concept centroids are re-fitted from the teacher
embeddings of recent steps on all ranks and re-matched to the previous ids. Each component decides its own timing:
the task its concept fits, the `TrainingLog` its lines, the `Validator` its evaluations, the `Checkpointer` its saves,
the `StopSignal` a preemption.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from kclip import console, dist
from kclip.config import Config
from kclip.train.memory import keep_freed_memory
from kclip.train.metrics import TrainingLog
from kclip.train.run_folder import claim
from kclip.train.schedule import lr_at
from kclip.train.signals import StopSignal
from kclip.train.state import Checkpointer, TrainingError, open_run
from kclip.train.task import StepResult
from kclip.train.validation import Validator

log = logging.getLogger("kclip.train")


def endless(loader):
    """Iterate the loader epoch after epoch; streaming advances its epoch on each new iteration. One empty pass is
    normal (a checkpoint taken at the very end of an epoch resumes into an exhausted epoch); two in a row mean the
    dataset cannot fill one global batch."""
    empty_passes = 0
    while empty_passes < 2:
        empty_passes += 1
        for batch in loader:
            empty_passes = 0
            yield batch
    raise TrainingError("the training loader yields no batch: the dataset is smaller than one global batch")


class StepCounters:
    """The step's counters: samples trained, records replaced or truncated by the loader, and non-finite steps
    (`count/skipped_nonfinite`, logged with their terms; `train.max_step_counters` in a row stop the run). A skipped step still advances the loop (schedule, sample order and checkpoint tags follow the
    batches consumed); DeepSpeed saw neither backward nor step for it, so engine.global_steps = steps - skipped."""

    def __init__(self, limit: int, counters: dict):
        self.limit, self.counters, self.streak = limit, counters, 0

    def record(self, step: int, result: StepResult, micro_batches: list[dict]) -> None:
        for batch in micro_batches:
            self.counters["replaced_samples"] += int(batch["replaced"].sum())
            self.counters["truncated_captions"] += int(batch["truncated"].sum())
        if result.finite:
            self.counters["samples"] += result.samples
            self.streak = 0
            return
        self.counters["skipped_nonfinite"] += 1
        self.streak += 1
        bad_terms = [k for k, v in result.terms.items() if not math.isfinite(float(v))] or ["total"]
        if dist.is_main():
            log.warning("step %d: non-finite loss (%s); update skipped", step, ", ".join(bad_terms))
        if self.streak >= self.limit:
            raise TrainingError(f"step {step}: {self.streak} consecutive non-finite losses "
                                f"(terms: {', '.join(bad_terms)}); stopping")


def train(cfg: Config, run_dir: str | Path, resume: str | None = None, allow_config_change: bool = False,
          overwrite: bool = False) -> dict:
    """Run training as configured; returns the final metrics. Call on every rank (config already validated and
    `check_fresh_start` passed). The run folder is locked while it runs; its log file is opened once the lock is
    held, so a refused run writes nothing into the folder."""
    run_dir = Path(run_dir)
    dist.init(cfg.dist.timeout_s, cfg.dist.rendezvous_timeout_s)
    if cfg.train.keep_freed_memory and dist.device().type == "cpu":
        keep_freed_memory()
    with claim(run_dir, overwrite), console.run_log(run_dir):
        stop = StopSignal(run_dir)
        run = open_run(cfg, run_dir, resume, allow_config_change)
        engine, task, counters = run.engine, run.task, run.counters
        if stop.agreed():  # during set-up: the folder is as a requeue expects it (the last checkpoint, if any)
            stop.mark_preempted(run.start_step, during_setup=True)
            return {"counters": counters, "eval": {}, "preempted_at": run.start_step}
        checkpointer = Checkpointer(run)
        validator = Validator(cfg, engine.module, run.tokenizer)
        training_log = TrainingLog(cfg, run_dir, task, counters, run.start_step)
        step_counters = StepCounters(cfg.train.max_bad_steps, counters)
        batches, accum = endless(run.loader), engine.gradient_accumulation_steps()
        for step in range(run.start_step, cfg.train.steps):
            lr = lr_at(step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
                       min_lr_ratio=cfg.optim.min_lr_ratio)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            with task.timer("data_ms"):
                micro_batches = [next(batches) for _ in range(accum)]
            result = task.step(micro_batches)
            step_counters.record(step, result, micro_batches)
            fit_stats = task.refit_concepts_if_due(step)
            training_log.record(step + 1, result, lr, fit_stats)
            validator.run_if_due(step + 1, training_log)
            if stop.agreed() and step + 1 < cfg.train.steps:
                checkpointer.save(step + 1)
                stop.mark_preempted(step + 1)
                training_log.close()
                return {"counters": counters, "eval": validator.last, "preempted_at": step + 1}
            checkpointer.save_if_due(step + 1)
        checkpointer.save_final()
        validator.run(cfg.train.steps, training_log)
        training_log.close()
        dist.barrier()
        return {"counters": counters, "eval": validator.last}
