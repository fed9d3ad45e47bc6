"""The trainable module handed to DeepSpeed: the student towers plus the Knowledge-CLIP heads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kclip.config import Config
from kclip.models.heads import ConceptHeads, DistillProjector
from kclip.models.student import build_student, clamp_logit_scale_, embed_dim


class KnowledgeCLIP(nn.Module):
    """One forward gives everything the three losses need.

    Heads exist only for losses with a non-zero weight, so a plain-CLIP run carries no unused parameters (DeepSpeed
    and DDP would otherwise wait for gradients that never come)."""

    def __init__(self, cfg: Config, tokenizer, teacher_dim: int | None):
        super().__init__()
        self.student = build_student(cfg.student, tokenizer)
        # A configured or pretrained temperature above the cap starts at the cap (training keeps it there: the task clamps after each step).
        clamp_logit_scale_(self.student.logit_scale, cfg.student.max_logit_scale)
        dim = embed_dim(self.student)
        self.projector = None
        # The relational form compares similarity structure, which needs no map into the teacher's space.
        if cfg.loss.distill_weight > 0 and cfg.loss.distill_kind != "relational":
            if teacher_dim is None:
                raise ValueError("loss.distill_weight > 0 needs the teacher's hidden size")
            self.projector = DistillProjector(dim, cfg.student.distill_hidden, teacher_dim)
        self.concept_heads = None
        if cfg.loss.concept_weight > 0:
            self.concept_heads = ConceptHeads(dim, cfg.student.concept_hidden, cfg.concepts.k, cfg.student.concept_heads)
        if cfg.student.grad_checkpointing:
            self.student.set_grad_checkpointing(True)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings. Pixels arrive in float32 from the loader; a bf16 engine holds bf16
        weights, so they are cast to the weights' dtype here rather than at every call site."""
        pixels = pixels.to(self.student.logit_scale.dtype)
        return F.normalize(self.student.encode_image(pixels), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings."""
        return F.normalize(self.student.encode_text(input_ids, attention_mask), dim=-1)

    def forward(self, pixels, input_ids, attention_mask) -> dict:
        image_emb = self.encode_image(pixels)
        text_emb = self.encode_text(input_ids, attention_mask)
        out = {
            "image_emb": image_emb,
            "text_emb": text_emb,
            "logit_scale": self.student.logit_scale.exp(),
        }
        if self.projector is not None:
            out["distill_pred"] = self.projector(text_emb)
        if self.concept_heads is not None:
            out["concept_logits"] = self.concept_heads(image_emb, text_emb)
        return out
