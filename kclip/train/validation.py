"""Retrieval on the validation split during training: every `eval.every` steps and at the end."""
from __future__ import annotations

from kclip import dist
from kclip.config import Config
from kclip.data.loader import build_loader
from kclip.retrieval.split import evaluate_split


class Validator:
    def __init__(self, cfg: Config, model, tokenizer):
        self.model, self.every, self.steps = model, cfg.eval.every, cfg.train.steps
        self.last: dict = {}
        self.loader = None
        if cfg.data.val:
            self.loader = build_loader(
                cfg.data.val, batch_size=cfg.eval.batch_size, image_size=cfg.student.image_size, train=False,
                student_tokenizer=tokenizer, student_max_len=cfg.student.text_max_len, shuffle=False, num_workers=0,
                label_columns=None,
            )

    def run_if_due(self, step: int, log) -> None:
        """After `step` completed steps (collective); the last step is evaluated by the loop's final `run`."""
        if self.loader is not None and self.every and step % self.every == 0 and step < self.steps:
            self.run(step, log)

    def run(self, step: int, log) -> dict:
        if self.loader is not None:
            self.last = evaluate_split(self.model, self.loader, dist.device())
            log.log(step, {f"eval/{k}": v for k, v in self.last.items()})
        return self.last
