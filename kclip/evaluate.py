"""Evaluation of a student on an MDS split: embeddings gathered from all ranks, then retrieval metrics.

Streaming pads every rank to the same sample count by repeating samples; rows are de-duplicated by their global
sample index before any metric is computed, so each pair counts exactly once.
"""
from __future__ import annotations

import torch

from kclip import dist


@torch.no_grad()
def embed_split(model, loader, device) -> dict:
    """Image and text embeddings (L2-normalised) of every sample in the loader's split, identical on all ranks."""
    was_training = model.training
    model.eval()
    images, texts, indices = [], [], []
    for batch in loader:
        images.append(model.encode_image(batch["pixels"].to(device)).float().cpu())
        texts.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
        indices.append(batch["index"].cpu())
    model.train(was_training)
    image = dist.all_gather_rows(torch.cat(images))
    text = dist.all_gather_rows(torch.cat(texts))
    index = dist.all_gather_rows(torch.cat(indices))
    order = torch.argsort(index, stable=True)
    index, first = index[order], torch.ones(len(order), dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    keep = order[first]
    return {"image": image[keep], "text": text[keep], "index": index[first]}


def ranks_of_targets(similarity: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column when columns are sorted by descending similarity. Ties count
    against the target, so a collapsed model (all scores equal) scores R@1 = 0 rather than 1."""
    target_scores = similarity.gather(1, targets[:, None])
    return (similarity >= target_scores).sum(dim=1) - 1


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image Recall@k and median rank (1-based) for paired rows (row i of each is a pair)."""
    sim = image @ text.T
    targets = torch.arange(sim.shape[0])
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        ranks = ranks_of_targets(s, targets)
        for k in ks:
            out[f"retrieval/{name}_R@{k}"] = float((ranks < k).float().mean())
        out[f"retrieval/{name}_median_rank"] = float(ranks.float().median() + 1)
    return out


def evaluate_split(model, loader, device) -> dict[str, float]:
    emb = embed_split(model, loader, device)
    return {**retrieval_metrics(emb["image"], emb["text"]), "num_samples": int(emb["index"].numel())}
