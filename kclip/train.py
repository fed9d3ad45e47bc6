"""The Knowledge-CLIP training loop, top to bottom.

Per optimizer step:  batch -> frozen ZeRO-3 teacher embeds the captions (no grad, a collective)
                     -> student forward -> contrastive (globally gathered) + distillation + concept losses
                     -> engine.backward / engine.step.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm import tqdm

from kclip import checkpoint, dist
from kclip.buffer import EmbeddingBuffer
from kclip.concepts import ConceptBank
from kclip.config import Config, diff_configs, from_dict, save_config, to_dict
from kclip.data.loader import build_loader
from kclip.ds_config import load_template
from kclip.evaluate import evaluate_split
from kclip.losses import KnowledgeCLIPLoss
from kclip.metrics import MetricsLogger
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.student import clamp_logit_scale_
from kclip.models.teacher import Teacher, build_teacher
from kclip.models.token_init import init_token_embeddings
from kclip.schedule import lr_at
from kclip.teacher_cache import TeacherCache, embed_cached, open_cache
from kclip.teacher_stats import TeacherStats, normalized_target
from kclip.tokenizers import student_tokenizer

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
        """Milliseconds per unit (micro-batch) since the last pop."""
        out, self.ms = {k: v / max(1, per) for k, v in self.ms.items()}, {}
        return out


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


def concept_fit_due(step: int, cfg: Config) -> bool:
    """After step `step` (0-based) completes: the first fit ends the warm-up, then every `recompute_every` steps."""
    done = step + 1
    c = cfg.concepts
    if done == c.warmup_steps:
        return True
    return c.recompute_every > 0 and done > c.warmup_steps and (done - c.warmup_steps) % c.recompute_every == 0


def all_finite(total: torch.Tensor) -> bool:
    """Collective: True on every rank only if the loss is finite on every rank."""
    flag = torch.tensor([float(torch.isfinite(total.detach()).all())], device=total.device)
    return dist.all_reduce_sum(flag).item() == dist.world_size()


class LogWindow:
    """Loss terms, samples and time since the last log line, summarised over all ranks."""

    def __init__(self):
        self.terms: dict[str, torch.Tensor] = {}
        self.micro_batches = self.samples = 0
        self.logit_scale = float("nan")
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], total: torch.Tensor, *, logit_scale: torch.Tensor, samples: int):
        for key, value in {**terms, "total": total}.items():
            self.terms[key] = self.terms.get(key, 0.0) + value.detach()
        self.micro_batches += 1
        self.samples += samples
        self.logit_scale = float(logit_scale.detach())

    def summary(self) -> dict[str, float]:
        """Collective (one all-reduce): mean loss terms over the window's micro-batches and all ranks, throughput;
        then starts a new window."""
        n = max(1, self.micro_batches)
        out = global_mean({f"loss/{k}": v / n for k, v in self.terms.items()})
        out.update(logit_scale=self.logit_scale,
                   samples_per_s=self.samples / max(time.perf_counter() - self.start, 1e-9))
        self.__init__()
        return out


def global_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar terms over ranks in one all-reduce, so logged numbers describe the global batch."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(dist.device())
    dist.all_reduce_sum(stacked)
    stacked /= dist.world_size()
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


@dataclass
class Run:
    """What a training run holds besides the loop's own bookkeeping: built by `setup`, restored by `restore`,
    checkpointed by `save`."""

    cfg: Config
    run_dir: Path
    engine: object  # deepspeed.DeepSpeedEngine around KnowledgeCLIP
    tokenizer: object
    loader: object  # StreamingDataLoader over the training split
    teacher: Teacher | None = None
    cache: TeacherCache | None = None
    stats: TeacherStats | None = None
    bank: ConceptBank | None = None
    buffer: EmbeddingBuffer | None = None
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
    run = Run(cfg, run_dir, engine, tokenizer, loader, teacher)
    if teacher is not None:
        run.stats = TeacherStats(teacher.hidden_size, cfg.loss.distill_target)
        if cfg.teacher.cache:
            run.cache = open_cache(cfg, teacher, run_dir)
    if cfg.loss.concept_weight > 0:
        run.bank = ConceptBank(cfg.concepts.k, teacher.hidden_size, niter=cfg.concepts.niter, seed=cfg.concepts.seed,
                               warm_start=cfg.concepts.warm_start, center=cfg.concepts.center)
        run.buffer = EmbeddingBuffer(cfg.concepts.buffer_size)
    return run


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
    if run.bank is not None and client.get("concepts"):
        run.bank.load_state_dict(client["concepts"])
    if run.stats is not None:
        run.stats.load_state_dict(client["teacher_stats"])
    if not elastic:
        checkpoint.set_rng_state(rank_state["rng"])
        if run.buffer is not None:
            run.buffer.load_state_dict(rank_state["buffer"])
    elif dist.is_main():
        log.warning("elastic resume: saved on %d ranks, running on %d with the same global batch; the sample order "
                    "continues exactly, per-rank RNG states and embedding buffers start afresh",
                    client["world_size"], dist.world_size())


def save(run: Run, step: int) -> None:
    """Checkpoint after `step` steps (collective)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    client_state = {
        "step": step, "loader": run.loader.state_dict(), "counters": run.counters, "world_size": dist.world_size(),
        "concepts": run.bank.state_dict() if run.bank is not None else None, "config": to_dict(run.cfg),
        "teacher_stats": run.stats.state_dict() if run.stats is not None else None,
        # Lets DeepSpeed convert this checkpoint to its universal format for a resume on another world size.
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    rank_state = {"rng": checkpoint.rng_state(), "buffer": run.buffer.state_dict() if run.buffer is not None else None}
    if run.cache is not None:
        run.cache.flush()
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
    dist.barrier()
    tag_dir = checkpoint.resolve(run_dir, resume) if resume else None
    elastic = tag_dir is not None and checkpoint.saved_world_size(tag_dir) != world
    run = setup(cfg, run_dir, load_universal=elastic)
    if tag_dir is not None:
        restore(run, tag_dir, elastic=elastic, allow_config_change=allow_config_change)
    engine, teacher, cache, bank, buffer, counters = run.engine, run.teacher, run.cache, run.bank, run.buffer, run.counters
    stats = run.stats
    start_step, accum = run.start_step, engine.gradient_accumulation_steps()
    loss_fn = KnowledgeCLIPLoss(cfg.loss)

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
    timer, window = Timer(), LogWindow()
    batches = endless(run.loader)
    bad_streak = 0
    last_eval: dict = {}
    # Rank 0's progress bar: steps, ETA and the latest logged loss and throughput (sparser when logging to a file).
    progress = tqdm(total=cfg.train.steps, initial=start_step, unit="step", disable=not dist.is_main(),
                    mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for step in range(start_step, cfg.train.steps):
        lr = lr_at(step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.steps,
                   min_lr_ratio=cfg.optim.min_lr_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(accum):
            with timer("data_ms"):
                batch = next(batches)
            counters["replaced_samples"] += int(batch["replaced"].sum())
            counters["truncated_captions"] += int(batch["truncated"].sum())
            teacher_target = soft_labels = None
            if teacher is not None:
                with timer("teacher_ms"):
                    teacher_emb = embed_cached(teacher, cache, batch).to(device)
                # Every rank adds the same gathered batch, so the statistics stay identical without another collective.
                stats.update(dist.all_gather_rows(teacher_emb))
                teacher_target = normalized_target(stats, teacher_emb)
                if bank is not None:
                    buffer.add(teacher_emb)
                    if bank.fitted:
                        soft_labels = bank.soft_labels(teacher_emb, cfg.concepts.tau)
            with timer("student_ms"):
                out = engine(batch["pixels"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device))
                total, terms = loss_fn(
                    image_emb=out["image_emb"], text_emb=out["text_emb"], logit_scale=out["logit_scale"],
                    distill_pred=out.get("distill_pred"), teacher_target=teacher_target,
                    concept_logits=out.get("concept_logits"), soft_labels=soft_labels,
                )
                # All ranks must take the same branch, or the gradient all-reduce would hang: agree on finiteness.
                finite = all_finite(total)
                if finite:
                    engine.backward(total)
                    engine.step()
                    clamp_logit_scale_(engine.module.student.logit_scale, cfg.student.max_logit_scale)
            if finite:
                bad_streak = 0
                window.add(terms, total, logit_scale=out["logit_scale"], samples=batch["pixels"].shape[0] * world)
                counters["samples"] += batch["pixels"].shape[0] * world
                continue
            counters["skipped_nonfinite"] += 1
            bad_streak += 1
            bad_terms = [k for k, v in terms.items() if not math.isfinite(float(v))] or ["total"]
            if dist.is_main():
                log.warning("step %d: non-finite loss (%s); update skipped", step, ", ".join(bad_terms))
            if bad_streak >= cfg.train.max_bad_steps:
                raise TrainingError(f"step {step}: {bad_streak} consecutive non-finite losses "
                                    f"(terms: {', '.join(bad_terms)}); stopping")

        fit_stats = None
        if bank is not None and concept_fit_due(step, cfg):
            with timer("kmeans_ms"):
                fit_stats = bank.fit(buffer.tensor(), mean=stats.mean)

        if (step + 1) % cfg.log.every == 0 or step + 1 == cfg.train.steps or fit_stats is not None:
            phase_ms = timer.pop(per=window.micro_batches)
            values = {**window.summary(), "lr": lr, **phase_ms, **{f"count/{k}": v for k, v in counters.items()},
                      "rss_mb": psutil.Process().memory_info().rss / 2**20}
            if teacher is not None:
                values.update(teacher_tokens=teacher.tokens_processed, teacher_tokens_padded=teacher.tokens_padded)
                if cache is not None:
                    values["teacher_cache_hit_rate"] = cache.hit_rate
            if fit_stats is not None:
                values.update({f"concepts/{k}": v for k, v in fit_stats.items()})
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
