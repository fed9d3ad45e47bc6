"""Run logging. `MetricsLogger` writes rank 0's metrics.jsonl (the source of truth), TensorBoard events and optional
Weights & Biases; `TrainingLog` decides when a line is due and what it holds, over all ranks, and drives rank 0's
progress bar."""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import torch

from kclip import console, dist
from kclip.config import to_dict


class LogWindow:
    """Loss terms, samples and time since the last log line, summarised over all ranks."""

    def __init__(self):
        self.terms: dict[str, torch.Tensor] = {}
        # Steps per term: not every step has every term (the loss skips the concept terms while there are no soft
        # labels), and dividing a term's sum by steps it was absent from would log it smaller than it was.
        self.term_steps: dict[str, int] = {}
        self.steps = self.samples = 0
        self.logit_scale = float("nan")
        self.start = time.perf_counter()

    def add(self, result):
        """A finite step's loss terms (the skipped ones are counted and logged by the loop)."""
        for key, value in {**result.terms, "total": result.total}.items():
            self.terms[key] = self.terms.get(key, 0.0) + value
            self.term_steps[key] = self.term_steps.get(key, 0) + 1
        self.steps += 1
        self.samples += result.samples
        self.logit_scale = float(result.logit_scale)

    def summary(self) -> dict[str, float]:
        """Collective (one all-reduce): each loss term's mean over the window's steps that had it and all ranks,
        throughput; then starts a new window."""
        out = global_mean({f"loss/{k}": v / self.term_steps[k] for k, v in self.terms.items()})
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


class TrainingLog:
    """The loop's log: a line every `log.every` steps, at the last step and after each concept fit (each loss term's
    mean over the window's finite steps that had it and all ranks, throughput, phase times per step, counters, memory,
    teacher and concept statistics); evaluation results as they come; rank 0's progress bar with ETA and the latest
    loss."""

    def __init__(self, cfg, run_dir: Path, task, counters: dict, start_step: int):
        self.every, self.steps = cfg.log.every, cfg.train.steps
        self.task, self.counters = task, counters
        self.window = LogWindow()
        self.logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, config=to_dict(cfg),
                                    enabled=dist.is_main(), wandb_project=cfg.log.wandb_project if cfg.log.wandb else None)
        self.progress = console.progress(self.steps, unit="step", initial=start_step)

    def record(self, step: int, result, lr: float, fit_stats: dict | None) -> None:
        """After `step` completed steps (collective when a line is due: every rank calls it every step)."""
        if result.finite:
            self.window.add(result)
        if step % self.every == 0 or step == self.steps or fit_stats is not None:
            values = self.values(lr, fit_stats)
            self.logger.log(step, values)
            self.progress.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}", lr=f"{lr:.2e}",
                                      samples_s=f"{values['samples_per_s']:.1f}", refresh=False)
        self.progress.update(1)

    def values(self, lr: float, fit_stats: dict | None) -> dict:
        task = self.task
        phase_ms = task.timer.pop(per=self.window.steps)  # before the summary starts a new window
        values = {**self.window.summary(), "lr": lr, **phase_ms, **{f"count/{k}": v for k, v in self.counters.items()},
                  "rss_mb": psutil.Process().memory_info().rss / 2**20}
        if task.teacher is not None:
            values.update(teacher_tokens=task.teacher.tokens_processed, teacher_tokens_padded=task.teacher.tokens_padded)
            if task.cache is not None:
                values["teacher_cache_hit_rate"] = task.cache.hit_rate
                # Rows found damaged and recomputed since this process started, summed over ranks.
                corrupt = dist.all_reduce_sum(torch.tensor([float(task.cache.corrupt_rows)], device=dist.device()))
                values["count/teacher_cache_corrupt_rows"] = int(corrupt.item())
        if fit_stats is not None:
            values.update({f"concepts/{k}": v for k, v in fit_stats.items()})
        return values

    def log(self, step: int, values: dict) -> None:
        self.logger.log(step, values)

    def close(self) -> None:
        self.logger.close()
        self.progress.close()


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool, wandb_project: str | None, config: dict, enabled: bool):
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        # Append: a resumed run continues the same file; steps say where each line belongs.
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("log.wandb=true but wandb is not installed (pip install 'kclip[wandb]')") from e
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(row) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                if self._tb:
                    self._tb.add_scalar(key, value, step)
        if self._wandb:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
