"""The KL a concept head reaches alone: fresh heads trained on frozen student embeddings against fixed soft labels.

In training the heads share every step with the towers (lr schedule, clipping, beta) and chase labels that move at
each re-fit; here nothing else moves, so what is left of the KL is what the embeddings (and the head's size) cannot
carry of the teacher's concepts. The gap between the KL logged in training and this one is the optimisation's.
"""
from __future__ import annotations

import torch

from kclip.losses import concept_loss, label_entropy
from kclip.models.heads import ConceptHeads


def mean_kl(heads: ConceptHeads, image_emb: torch.Tensor, text_emb: torch.Tensor,
            soft_labels: torch.Tensor) -> dict[str, float]:
    """Each head's mean KL(q || softmax(head)) in nats: its soft cross-entropy minus the labels' entropy."""
    with torch.no_grad():
        entropy = label_entropy(soft_labels)
        return {kind: float(concept_loss(logits, soft_labels) - entropy)
                for kind, logits in heads(image_emb, text_emb).items()}


def train_heads_alone(image_emb: torch.Tensor, text_emb: torch.Tensor, soft_labels: torch.Tensor, *, hidden: int,
                      kinds, steps: int = 2000, lr: float = 1e-3, seed: int = 0) -> ConceptHeads:
    """Fresh concept heads (the training ones' architecture) fitted by full-batch Adam on the summed soft
    cross-entropy of all heads: their parameters are disjoint, so each head trains exactly as it would alone."""
    torch.manual_seed(seed)
    heads = ConceptHeads(image_emb.shape[1], hidden, soft_labels.shape[1], kinds)
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(concept_loss(logits, soft_labels) for logits in heads(image_emb, text_emb).values())
        loss.backward()
        optimizer.step()
    return heads


def reference_kl(image_emb: torch.Tensor, text_emb: torch.Tensor, soft_labels: torch.Tensor, *, hidden: int,
                 kinds, steps: int = 2000, lr: float = 1e-3, holdout: float = 0.2, seed: int = 0) -> dict[str, dict]:
    """Heads trained alone on all but a random `holdout` fraction of the rows; each head's KL on the rows it was
    trained on (what the embeddings can carry) and on the held-out ones (what of it generalises)."""
    order = torch.randperm(len(soft_labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(order) * (1 - holdout))
    fit, held = order[:cut], order[cut:]
    heads = train_heads_alone(image_emb[fit], text_emb[fit], soft_labels[fit], hidden=hidden, kinds=kinds,
                              steps=steps, lr=lr, seed=seed)
    on_fit = mean_kl(heads, image_emb[fit], text_emb[fit], soft_labels[fit])
    on_held = mean_kl(heads, image_emb[held], text_emb[held], soft_labels[held])
    return {kind: {"train": on_fit[kind], "heldout": on_held[kind]} for kind in on_fit}
