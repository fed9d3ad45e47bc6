"""A 2-D PCA map of teacher caption embeddings, coloured by the concept (nearest centroid) of a run's concept bank.

Inputs: the concept centroids saved in a checkpoint's client state, the run's teacher (rebuilt from its config, one
process, not sharded: a 7B teacher needs ~14-28 GB of host or GPU memory) and captions from an MDS folder, taken at
evenly spaced indices. PCA in the space the bank clusters in (`ConceptBank.prepare`): x_i = normalize(t_i - m) with m
the bank's mean (t_i - m for a bank that is not spherical); coordinates = (x_i - mean) V[:, :2] with V from the SVD of
the centred x; centroids, which live in that space, are projected the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kclip.concepts.bank import ConceptBank
from kclip.config import Config
from kclip.data.datasets import CaptionDataset
from kclip.eval.knn_overlap import teacher_embeddings


def sample_captions(data_dir: str, limit: int) -> list[str]:
    """Up to `limit` captions at evenly spaced indices of an MDS folder (no image is decoded)."""
    dataset = CaptionDataset(data_dir, batch_size=1)
    n = dataset.num_samples
    indices = sorted({int(i) for i in torch.linspace(0, n - 1, min(limit, n))})
    return [dataset[i]["caption"] for i in indices]


def pca_2d(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """2-D PCA coordinates of `x` and of `others` in the same basis, plus the explained variance ratio [2]."""
    mean = x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:2].T
    explained = (s[:2] ** 2) / (s**2).sum()
    return ((x - mean) @ basis, *[(o - mean) @ basis for o in others], explained)


def bank_pca(bank: ConceptBank, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For raw teacher rows `emb` [n, dim]: their 2-D PCA coordinates in the bank's space, the centroids' in the same
    basis, the explained variance ratio [2] and each row's concept id."""
    x = bank.prepare(emb)
    return (*pca_2d(x, bank.centroids.to(x.device)), bank.assign(emb))


def concept_map(cfg: Config, concepts: dict, data_dir: str, out: Path, *, title: str, limit: int = 2000) -> dict:
    """Draw the map to `out` (PNG); returns {num_captions, k, explained_variance}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kclip.teacher.load import build_teacher

    captions = sample_captions(data_dir, limit)
    teacher = build_teacher(cfg.teacher, shard=False)
    saved = concepts["config"]
    bank = ConceptBank(saved["k"], saved["dim"], spherical=saved["spherical"])
    bank.load_state_dict(concepts)
    coords, centre_coords, explained, labels = bank_pca(bank, teacher_embeddings(teacher, captions))
    fig, ax = plt.subplots(figsize=(7, 6))
    points = ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap="tab20", s=8, alpha=0.8)
    ax.scatter(centre_coords[:, 0], centre_coords[:, 1], c="black", marker="x", s=40, label="centroids")
    ax.set_xlabel(f"PC1 ({explained[0]:.0%})")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%})")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.colorbar(points, ax=ax, label="concept id")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"num_captions": len(captions), "k": bank.k, "explained_variance": [float(v) for v in explained]}
