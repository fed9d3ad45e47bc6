"""The evaluation settings `kclip eval` offers as options, apart from the probes that use them: those import torch,
and the command line lists and checks its options without it (`kclip eval --help` answers at once)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_K = 10  # neighbours per caption in the teacher kNN overlap (kclip.eval.knn_overlap)

# Zero-shot prompts (kclip.eval.zeroshot).
DEFAULT_TEMPLATES = (
    "{}",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "an emoji of {}.",
    "a photo of the {}.",
)


@dataclass
class ProbeConfig:
    """The caption reconstruction probe's decoder and budget (kclip.eval.caption_em)."""

    steps: int = 1000
    batch_size: int = 64
    hidden: int = 256
    layers: int = 2
    lr: float = 2e-3
    max_bytes: int = 128
    seed: int = 0

    def describe(self) -> str:
        return "gru " + " ".join(f"{k}={v}" for k, v in asdict(self).items())
