"""Rank-0 run logging: metrics.jsonl (the source of truth), TensorBoard events, optional Weights & Biases."""
from __future__ import annotations

import json
import time
from pathlib import Path


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
