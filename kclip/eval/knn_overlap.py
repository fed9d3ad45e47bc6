"""How much of the teacher's neighbourhood structure the student text encoder reproduces.

overlap@k = mean_i |N_k^student(i) ∩ N_k^teacher(i)| / k, where N_k(i) are the k captions most cosine-similar to
caption i in that space (i itself excluded). Captions are de-duplicated by text first (a duplicate would be a trivial
shared neighbour). 1 = identical neighbourhoods; unrelated spaces score about k / (n - 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kclip import console, dist
from kclip.eval.protocol import DEFAULT_K

BLOCK = 1024
TEACHER_BATCH = 256


def nearest(x: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] indices of each row's k most cosine-similar other rows."""
    x = F.normalize(x.float(), dim=-1)
    out = []
    for rows in torch.arange(len(x)).split(BLOCK):
        sim = x[rows] @ x.T
        sim[torch.arange(len(rows)), rows] = float("-inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def knn_overlap(a: torch.Tensor, b: torch.Tensor, k: int = DEFAULT_K) -> float:
    """overlap@k between two embeddings [n, d_a], [n, d_b] of the same n items (k capped at n - 1)."""
    k = min(k, len(a) - 1)
    if k < 1:
        raise ValueError("knn overlap needs at least 2 distinct captions")
    na, nb = nearest(a, k), nearest(b, k)
    shared = (na[:, :, None] == nb[:, None, :]).any(dim=2).sum(dim=1)
    return float(shared.float().mean() / k)


@torch.no_grad()
def teacher_embeddings(teacher, captions: list[str]) -> torch.Tensor:
    """[n, h] teacher embeddings on every rank. Each rank embeds a contiguous slice; all ranks run the same number
    of `embed` calls (it is a collective when the teacher is sharded), empty ones included."""
    world, rank = dist.world_size(), dist.rank()
    per_rank = math.ceil(len(captions) / world)
    mine = captions[rank * per_rank : (rank + 1) * per_rank]
    out = []
    starts = range(0, max(per_rank, 1), TEACHER_BATCH)
    for start in console.progress(len(starts), "kNN probe: teacher embeddings", "batch", iterable=starts, leave=False):
        part = mine[start : start + TEACHER_BATCH]
        if part:
            ids, mask = teacher.tokenize(part)
        else:
            ids = mask = torch.zeros(0, 1, dtype=torch.long)
        out.append(teacher.embed(ids, mask).float().cpu())
    return dist.all_gather_rows(torch.cat(out))


def distinct_captions(captions: list[str], limit: int | None = None) -> list[int]:
    """Row of the first occurrence of each distinct caption, in order, at most `limit` of them."""
    seen, rows = set(), []
    for i, c in enumerate(captions):
        if c not in seen:
            seen.add(c)
            rows.append(i)
            if limit is not None and len(rows) == limit:
                break
    return rows
