"""Heads that turn student embeddings into the teacher's language: the distillation projector and concept heads."""
from __future__ import annotations

import torch
import torch.nn as nn

from kclip.config import CONCEPT_HEAD_KINDS


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class DistillProjector(nn.Module):
    """Student text embedding -> teacher hidden size (the paper's code: 512 -> 64 -> 4096 for Llama-2-7B)."""

    def __init__(self, embed_dim: int, hidden: int, teacher_dim: int):
        super().__init__()
        self.net = mlp(embed_dim, hidden, teacher_dim)

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        return self.net(text_emb)


class ConceptHeads(nn.Module):
    """Logits over K concepts from the image embedding, the text embedding and their concatenation (the paper's
    classifier is the joint one); `kinds` picks which exist and are trained."""

    def __init__(self, embed_dim: int, hidden: int, k: int, kinds=CONCEPT_HEAD_KINDS):
        super().__init__()
        widths = {"image": embed_dim, "text": embed_dim, "joint": 2 * embed_dim}
        self.heads = nn.ModuleDict({kind: mlp(widths[kind], hidden, k) for kind in kinds})

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {"image": image_emb, "text": text_emb, "joint": torch.cat([image_emb, text_emb], dim=-1)}
        return {kind: head(inputs[kind]) for kind, head in self.heads.items()}
