"""A training run's state: what `setup` builds (teacher, student engine, loader, task), what `restore` brings back
from a checkpoint, and the `Checkpointer` that decides when to save it."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from kclip import dist
from kclip.config import Config, diff_configs, from_dict, save_config, to_dict
from kclip.data.loader import build_loader
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.student import save_student_copy
from kclip.models.token_init import init_token_embeddings
from kclip.teacher.cache import open_cache
from kclip.teacher.model import build_teacher
from kclip.tokenizers import student_tokenizer
from kclip.train import checkpoint
from kclip.train.engine import build_engine, partitions_optimizer, seed_everything
from kclip.train.task import KnowledgeCLIPTask

log = logging.getLogger("kclip.train")


class TrainingError(RuntimeError):
    pass


@dataclass
class Run:
    """What a training run holds besides the loop's own bookkeeping: built by `setup`, restored by `restore`,
    saved by the `Checkpointer`."""

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

    began = time.monotonic()
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    # The teacher loads first: its hidden size shapes the projector, and it unsets its ZeRO-3 context before the
    # student is built, so the student is never partitioned.
    teacher = build_teacher(cfg.teacher) if cfg.needs_teacher else None
    if teacher is not None:
        began = dist.log_startup("teacher built", began)
    tokenizer = student_tokenizer(cfg)
    model = KnowledgeCLIP(cfg, tokenizer, teacher.hidden_size if teacher else None)
    init_token_embeddings(model.student, cfg.student, teacher)
    engine = build_engine(model, cfg, load_universal=load_universal)
    if cfg.train.compile:
        engine.compile()
    began = dist.log_startup("student and its DeepSpeed engine built", began)
    loader = build_loader(
        cfg.data.train, batch_size=engine.train_micro_batch_size_per_gpu(), image_size=cfg.student.image_size,
        train=True, student_tokenizer=tokenizer, student_max_len=cfg.student.text_max_len,
        teacher_tokenizer=teacher.tokenizer if teacher else None, teacher_max_len=cfg.teacher.max_len,
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )
    cache = open_cache(cfg, teacher, run_dir) if teacher is not None and cfg.teacher.cache else None
    dist.log_startup("training loader and teacher cache opened", began)
    return Run(cfg, run_dir, engine, tokenizer, loader, KnowledgeCLIPTask(cfg, engine, teacher=teacher, cache=cache))


def restore(run: Run, tag_dir: Path, *, elastic: bool, universal: bool, allow_config_change: bool) -> None:
    """Continue from checkpoint `tag_dir`: weights, optimizer, step, sample order, counters, concepts; and, on the
    same world size, every rank's RNG state and embedding buffer (so the run continues bit for bit). `universal`:
    DeepSpeed's files are read from the checkpoint's world-size-independent copy."""
    engine_dir = checkpoint.universal_copy(tag_dir) if universal else tag_dir
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


def open_run(cfg: Config, run_dir: Path, resume: str | None, allow_config_change: bool) -> Run:
    """Set up the run and, with `resume`, restore it (collective). The run's config.yaml is written only once the
    resume was accepted, so a refused resume leaves the folder as it was."""
    if dist.is_main():
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    dist.barrier()
    tag_dir = checkpoint.resolve(run_dir, resume) if resume else None
    elastic = universal = False
    if tag_dir is not None:
        checkpoint.check_optimizer_layout(tag_dir, partitions_optimizer(cfg), cfg.train.zero_stage)
        elastic = checkpoint.saved_world_size(tag_dir) != dist.world_size()
        # A partitioned optimizer state is cut for the saved world size; a whole one loads on any.
        universal = elastic and checkpoint.optimizer_partitioned(tag_dir)
    run = setup(cfg, run_dir, load_universal=universal)
    if tag_dir is not None:
        restore(run, tag_dir, elastic=elastic, universal=universal, allow_config_change=allow_config_change)
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
        save_student_copy(cfg, run_dir)
    return run


class Checkpointer:
    """Saves the run every `checkpoint.every` steps, on a stop signal and at the end, keeping `keep_last`."""

    def __init__(self, run: Run):
        self.run = run
        self.every, self.steps = run.cfg.checkpoint.every, run.cfg.train.steps

    def save_if_due(self, step: int) -> None:
        """After `step` completed steps; the last step is saved by `save_final`."""
        if step % self.every == 0 and step < self.steps:
            self.save(step)

    def save_final(self) -> None:
        """The end of training, unless this process resumed an already finished run and trained nothing (a fresh
        run starts at step 0 < steps; a checkpoint is never taken at step 0)."""
        if self.run.start_step < self.steps:
            self.save(self.steps)

    def save(self, step: int) -> None:
        """Checkpoint after `step` steps (collective)."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        run, task = self.run, self.run.task
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
