"""The Knowledge-CLIP training loop, top to bottom.

Per optimizer step:  the step's micro-batches -> `KnowledgeCLIPTask.step` (kclip/task.py): the frozen ZeRO-3
                     teacher embeds the captions (no grad, a collective) -> student forward -> contrastive (globally
                     gathered) + distillation + concept losses over the whole step's batch -> backward / step.
Every `concepts.recompute_every` steps after a warm-up, the concept centroids are re-fitted from the teacher
embeddings of recent steps on all ranks and re-matched to the previous ids.
"""
from __future__ import annotations

import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

from kclip import dist
from kclip.config import Config, diff_configs, from_dict, save_config, to_dict
from kclip.data.loader import build_loader
from kclip.ds_config import load_template
from kclip.eval.split import evaluate_split
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.student import save_hf_clip_copy
from kclip.models.token_init import init_token_embeddings
from kclip.teacher.cache import open_cache
from kclip.teacher.model import build_teacher
from kclip.tokenizers import student_tokenizer
from kclip.train import checkpoint
from kclip.train.metrics import MetricsLogger
from kclip.train.schedule import lr_at
from kclip.train.task import KnowledgeCLIPTask, StepResult

log = logging.getLogger("kclip.train")


class TrainingError(RuntimeError):
    pass


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


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's --signal, a scheduler's preemption notice) only set a flag here; the ranks agree on
    it at the next step boundary, checkpoint together and exit cleanly. Acting inside the handler could leave ranks
    in different collectives, which is how preemption turns into a hang."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank got a signal."""
        return dist.all_reduce_max(int(self.received is not None)) > 0


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


class LogWindow:
    """Loss terms, samples and time since the last log line, summarised over all ranks."""

    def __init__(self):
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = self.samples = 0
        self.logit_scale = float("nan")
        self.start = time.perf_counter()

    def add(self, result: StepResult):
        """A finite step's loss terms (the skipped ones are counted and logged by the loop)."""
        for key, value in {**result.terms, "total": result.total}.items():
            self.terms[key] = self.terms.get(key, 0.0) + value
        self.steps += 1
        self.samples += result.samples
        self.logit_scale = float(result.logit_scale)

    def summary(self) -> dict[str, float]:
        """Collective (one all-reduce): mean loss terms over the window's steps and all ranks, throughput; then
        starts a new window."""
        n = max(1, self.steps)
        out = global_mean({f"loss/{k}": v / n for k, v in self.terms.items()})
        out.update(logit_scale=self.logit_scale,
                   samples_per_s=self.samples / max(time.perf_counter() - self.start, 1e-9))
        self.__init__()
        return out


class BadSteps:
    """Non-finite steps: counted (`count/skipped_nonfinite`) and logged with their terms; `train.max_bad_steps` in a
    row stop the run. A skipped step still advances the loop (schedule, sample order and checkpoint tags follow the
    batches consumed); DeepSpeed saw neither backward nor step for it, so engine.global_steps = steps - skipped."""

    def __init__(self, limit: int, counters: dict):
        self.limit, self.counters, self.streak = limit, counters, 0

    def record(self, step: int, result: StepResult) -> None:
        if result.finite:
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


def global_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar terms over ranks in one all-reduce, so logged numbers describe the global batch."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(dist.device())
    dist.all_reduce_sum(stacked)
    stacked /= dist.world_size()
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


def log_values(window: LogWindow, task: KnowledgeCLIPTask, counters: dict, lr: float, fit_stats: dict | None) -> dict:
    """One log line: the window's losses and throughput, phase times per step, counters, memory, teacher and concept
    statistics. Collective (the window's all-reduce)."""
    phase_ms = task.timer.pop(per=window.steps)  # before the summary starts a new window
    values = {**window.summary(), "lr": lr, **phase_ms, **{f"count/{k}": v for k, v in counters.items()},
              "rss_mb": psutil.Process().memory_info().rss / 2**20}
    if task.teacher is not None:
        values.update(teacher_tokens=task.teacher.tokens_processed, teacher_tokens_padded=task.teacher.tokens_padded)
        if task.cache is not None:
            values["teacher_cache_hit_rate"] = task.cache.hit_rate
    if fit_stats is not None:
        values.update({f"concepts/{k}": v for k, v in fit_stats.items()})
    return values


@dataclass
class Run:
    """What a training run holds besides the loop's own bookkeeping: built by `setup`, restored by `restore`,
    checkpointed by `save`."""

    cfg: Config
    run_dir: Path
    engine: object  # deepspeed.DeepSpeedEngine around KnowledgeCLIP
    tokenizer: object
    loader: object  # StreamingDataLoader over the training split
    task: KnowledgeCLIPTask  # the step: teacher, teacher cache and statistics, concept bank and buffer, loss
    counters: dict = field(default_factory=lambda: {"skipped_nonfinite": 0, "replaced_samples": 0,
                                                   "truncated_captions": 0, "samples": 0})
    start_step: int = 0


def setup(cfg: Config, run_dir: Path, *, load_universal: bool) -> Run:
    """Teacher, student engine, loader, teacher cache and concept bank (collective)."""
    import deepspeed

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    # The teacher loads first: its hidden size shapes the projector, and it unsets its ZeRO-3 context before the
    # student is built, so the student is never partitioned.
    teacher = build_teacher(cfg.teacher) if cfg.needs_teacher else None
    tokenizer = student_tokenizer(cfg)
    model = KnowledgeCLIP(cfg, tokenizer, teacher.hidden_size if teacher else None)
    init_token_embeddings(model.student, cfg.student, teacher)
    ds_config = student_ds_config(cfg)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds_config)
    if cfg.train.compile:
        engine.compile()
    loader = build_loader(
        cfg.data.train, batch_size=engine.train_micro_batch_size_per_gpu(), image_size=cfg.student.image_size,
        train=True, student_tokenizer=tokenizer, student_max_len=cfg.student.text_max_len,
        teacher_tokenizer=teacher.tokenizer if teacher else None, teacher_max_len=cfg.teacher.max_len,
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )
    cache = open_cache(cfg, teacher, run_dir) if teacher is not None and cfg.teacher.cache else None
    return Run(cfg, run_dir, engine, tokenizer, loader, KnowledgeCLIPTask(cfg, engine, teacher=teacher, cache=cache))


def restore(run: Run, tag_dir: Path, *, elastic: bool, allow_config_change: bool) -> None:
    """Continue from checkpoint `tag_dir`: weights, optimizer, step, sample order, counters, concepts; and, on the
    same world size, every rank's RNG state and embedding buffer (so the run continues bit for bit)."""
    engine_dir = checkpoint.universal_copy(tag_dir) if elastic else tag_dir
    client, rank_state = checkpoint.load(run.engine, tag_dir, engine_dir)
    changed = diff_configs(from_dict(client["config"]), run.cfg)
    changed = [c for c in changed if not c.startswith(("train.steps", "checkpoint.", "log.", "eval.", "dist."))]
    if changed and not allow_config_change:
        raise TrainingError("resuming with a changed config (pass --allow-config-change to accept): " + "; ".join(changed))
    run.start_step = client["step"]
    run.loader.load_state_dict(client["loader"])
    run.counters.update(client["counters"])
    task = run.task
    if task.bank is not None and client.get("concepts"):
        task.bank.load_state_dict(client["concepts"])
    if task.stats is not None:
        task.stats.load_state_dict(client["teacher_stats"])
    if not elastic:
        checkpoint.set_rng_state(rank_state["rng"])
        if task.buffer is not None:
            task.buffer.load_state_dict(rank_state["buffer"])
    elif dist.is_main():
        log.warning("elastic resume: saved on %d ranks, running on %d with the same global batch; the sample order "
                    "continues exactly, per-rank RNG states and embedding buffers start afresh",
                    client["world_size"], dist.world_size())


def save(run: Run, step: int) -> None:
    """Checkpoint after `step` steps (collective)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    task = run.task
    client_state = {
        "step": step, "loader": run.loader.state_dict(), "counters": run.counters, "world_size": dist.world_size(),
        "concepts": task.bank.state_dict() if task.bank is not None else None, "config": to_dict(run.cfg),
        "teacher_stats": task.stats.state_dict() if task.stats is not None else None,
        # Lets DeepSpeed convert this checkpoint to its universal format for a resume on another world size.
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    rank_state = {"rng": checkpoint.rng_state(), "buffer": task.buffer.state_dict() if task.buffer is not None else None}
    if task.cache is not None:
        task.cache.flush()
    checkpoint.save(run.engine, run.run_dir / "checkpoints", step, client_state, rank_state, run.cfg.checkpoint.keep_last)


def train(cfg: Config, run_dir: str | Path, resume: str | None = None, allow_config_change: bool = False) -> dict:
    """Run training as configured; returns the final metrics. Call on every rank (config already validated)."""
    run_dir = Path(run_dir)
    dist.init(cfg.dist.timeout_s)
    world = dist.world_size()
    device = dist.device()
    if dist.is_main():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_hf_clip_copy(cfg, run_dir)
    dist.barrier()
    tag_dir = checkpoint.resolve(run_dir, resume) if resume else None
    elastic = tag_dir is not None and checkpoint.saved_world_size(tag_dir) != world
    run = setup(cfg, run_dir, load_universal=elastic)
    if tag_dir is not None:
        restore(run, tag_dir, elastic=elastic, allow_config_change=allow_config_change)
    engine, task, counters = run.engine, run.task, run.counters
    start_step, accum = run.start_step, engine.gradient_accumulation_steps()

    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, config=to_dict(cfg), enabled=dist.is_main(),
                           wandb_project=cfg.log.wandb_project if cfg.log.wandb else None)
    val_loader = None
    if cfg.data.val:
        val_loader = build_loader(
            cfg.data.val, batch_size=cfg.eval.batch_size, image_size=cfg.student.image_size, train=False,
            student_tokenizer=run.tokenizer, student_max_len=cfg.student.text_max_len, shuffle=False, num_workers=0,
            label_columns=None,
        )

    stop = StopSignal()
    preempted_marker = run_dir / "PREEMPTED"
    if dist.is_main():
        preempted_marker.unlink(missing_ok=True)
    window = LogWindow()
    batches = endless(run.loader)
    bad_steps = BadSteps(cfg.train.max_bad_steps, counters)
    last_eval: dict = {}
    # Rank 0's progress bar: steps, ETA and the latest logged loss and throughput (sparser when logging to a file).
    progress = tqdm(total=cfg.train.steps, initial=start_step, unit="step", disable=not dist.is_main(),
                    mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for step in range(start_step, cfg.train.steps):
        lr = lr_at(step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
                   min_lr_ratio=cfg.optim.min_lr_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        with task.timer("data_ms"):
            micro_batches = [next(batches) for _ in range(accum)]
        for batch in micro_batches:
            counters["replaced_samples"] += int(batch["replaced"].sum())
            counters["truncated_captions"] += int(batch["truncated"].sum())
        result = task.step(micro_batches)
        bad_steps.record(step, result)
        if result.finite:
            window.add(result)
            counters["samples"] += result.samples
        fit_stats = task.refit_concepts_if_due(step)

        if (step + 1) % cfg.log.every == 0 or step + 1 == cfg.train.steps or fit_stats is not None:
            values = log_values(window, task, counters, lr, fit_stats)
            logger.log(step + 1, values)
            progress.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}", lr=f"{lr:.2e}",
                                 samples_s=f"{values['samples_per_s']:.1f}", refresh=False)
        progress.update(1)

        if val_loader is not None and cfg.eval.every and (step + 1) % cfg.eval.every == 0:
            last_eval = evaluate_split(engine.module, val_loader, device)
            logger.log(step + 1, {f"eval/{k}": v for k, v in last_eval.items()})
        if stop.agreed() and step + 1 < cfg.train.steps:
            save(run, step + 1)
            if dist.is_main():
                # The SLURM script requeues the job when it finds this marker.
                preempted_marker.write_text(f"step={step + 1}\n")
                log.warning("stop signal received: checkpointed step %d; resume with --resume latest", step + 1)
            logger.close()
            progress.close()
            return {"counters": counters, "eval": last_eval, "preempted_at": step + 1}
        if (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.train.steps:
            save(run, step + 1)

    if start_step < cfg.train.steps or not resume:
        save(run, cfg.train.steps)
    if val_loader is not None:
        last_eval = evaluate_split(engine.module, val_loader, device)
        logger.log(cfg.train.steps, {f"eval/{k}": v for k, v in last_eval.items()})
    logger.close()
    progress.close()
    dist.barrier()
    return {"counters": counters, "eval": last_eval}
