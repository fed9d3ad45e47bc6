"""A training run's state: what `setup` builds (teacher, student engine, loader, task), what `restore` brings back
from a checkpoint, and the `Checkpointer` that decides when to save it."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from kclip import dist
from kclip.config import Config, diff_configs, from_dict, save_config, to_dict
from kclip.data.loader import build_loader, tokenize
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.student import save_student_copy
from kclip.models.token_init import init_token_embeddings
from kclip.teacher.cache import open_cache
from kclip.teacher.load import build_teacher
from kclip.tokenizers import student_tokenizer, student_tokenizer_spec
from kclip.train import checkpoint
from kclip.train.engine import build_engine, partitions_optimizer, seed_everything
from kclip.train.task import KnowledgeCLIPTask

log = logging.getLogger("kclip.train")


class TrainingError(RuntimeError):
    pass


# Captions whose student tokenization stands for the tokenizer's behaviour: words, case, digits, punctuation, accents
# and an emoji, and one longer than any student.text_max_len, so that truncation and the end-of-text token count too.
TOKENIZER_PROBES = ("a dog on the grass", "Two RED cubes, 3.5 cm apart: naïve café 🐕", "apple pie " * 1000)


def tokenizer_fingerprint(tokenizer, max_len: int) -> str:
    """A hash of the student's token ids and masks for TOKENIZER_PROBES at `max_len`: it changes with the tokenizer's
    files and with kclip's handling of them alike (student captions that began to end with the end-of-text token)."""
    ids, mask, _ = tokenize(tokenizer, list(TOKENIZER_PROBES), max_len)
    return hashlib.sha256(json.dumps([ids.tolist(), mask.tolist()]).encode()).hexdigest()[:16]


# Config keys a resume may change without --allow-config-change: they decide when and how the run saves, logs, evaluates
# and waits, not what a step computes (teacher.convert_*: how the teacher's GGUF is read, not the teacher).
RESUMABLE_CHANGES = ("train.steps", "checkpoint.", "log.", "eval.", "dist.", "teacher.convert_gguf",
                     "teacher.convert_timeout_s")


def token_init_teacher(cfg: Config):
    """With `student.token_init=teacher` but no teacher loss (the ablation that splits the teacher's gain into its
    token embeddings and its losses): the teacher loaded whole on this rank for its input embeddings alone, dropped
    once the student has them. Loading leaves the RNG alone, so the student's other weights are those of the same
    seed's plain run. None without token_init=teacher."""
    return build_teacher(cfg.teacher, shard=False) if cfg.student.token_init == "teacher" else None


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
    init_token_embeddings(model.student, cfg.student, teacher or token_init_teacher(cfg))
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
    changed = [c for c in changed if not c.startswith(RESUMABLE_CHANGES)]
    if changed and not allow_config_change:
        raise TrainingError("resuming with a changed config (pass --allow-config-change to accept): " + "; ".join(changed))
    check_tokenization(run, tag_dir, client.get("tokenizer_fingerprint"), allow_config_change)
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


def check_tokenization(run: Run, tag_dir: Path, saved: str | None, allow_change: bool) -> None:
    """Refuse to resume on captions tokenized otherwise than the checkpoint's were (its text tower learnt those ids),
    unless `allow_change`. A checkpoint from before fingerprints were saved (`saved` None) gets a warning."""
    if saved is None:
        if dist.is_main():
            log.warning("checkpoint %s holds no tokenizer fingerprint (saved by an older kclip): whether this run "
                        "tokenizes captions as it was trained cannot be checked", tag_dir)
        return
    if saved == tokenizer_fingerprint(run.tokenizer, run.cfg.student.text_max_len):
        return
    differs = (f"checkpoint {tag_dir} tokenizes captions differently from this run's student tokenizer "
               f"({student_tokenizer_spec(run.cfg)}, student.text_max_len {run.cfg.student.text_max_len})")
    if not allow_change:
        raise TrainingError(f"{differs}; resume with the tokenizer it was trained with or start a new run (or pass "
                            f"--allow-config-change to accept)")
    if dist.is_main():
        log.warning("%s; accepted (--allow-config-change)", differs)


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
        self.tokenizer_fingerprint = tokenizer_fingerprint(run.tokenizer, run.cfg.student.text_max_len)

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
            "tokenizer_fingerprint": self.tokenizer_fingerprint,  # compared at resume (check_tokenization)
            # Lets DeepSpeed convert this checkpoint to its universal format for a resume on another world size.
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        rank_state = {"rng": checkpoint.rng_state(), "buffer": task.buffer.state_dict() if task.buffer is not None else None}
        if task.cache is not None:
            task.cache.flush()
        checkpoint.save(run.engine, run.run_dir / "checkpoints", step, client_state, rank_state, run.cfg.checkpoint.keep_last)
