"""Running statistics of the teacher's caption embeddings: the mean (and covariance) that distillation targets and the
concept bank are centred (or whitened) with.

Why: decoder-LM embeddings are anisotropic. On the demo (SmolLM2, mean-pooled, L2-normalised) captions have a mean
cosine of 0.940 to their mean direction, so a raw target is ~94% one constant vector and a projector that outputs that
constant already scores cos 0.94. Centred, the mean pairwise cosine is 0.003: what is left is what tells captions apart.

The statistics are exact running sums over every global batch the run has seen (not an EMA: the teacher is frozen, so
its embedding distribution does not drift and every batch deserves equal weight). They are updated from the batch
gathered over all ranks, so every rank computes the same float64 sums locally with no extra collective, and they are
saved in checkpoints, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shrinkage(count: int, dim: int) -> float:
    """The weight s of the isotropic part of the covariance that whitening inverts, (1 - s) C + s (tr C / d) I, with
    s = d / (n + d) after n rows.

    With fewer rows than dimensions (the first whitener sees one global batch: 64 rows of SmolLM2's 576) most of the
    sample covariance's eigenvalues are ~0, and whitening would scale the directions outside the rows' span far above
    the ones inside (~30x the top direction with a floor of 1% of the mean eigenvalue): noise a target must not
    carry. s is near 1 there (64 rows: 0.9, a target close to the centred one) and fades as the statistics earn their
    directions (the demo's 12800 rows: 0.04)."""
    return dim / (count + dim)


def centred(emb: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Teacher embeddings [n, d] minus a mean [d], in float32 on their device: the one centring that distillation
    targets and the concept bank (with the mean frozen at its fit) both use."""
    return emb.float() - mean.to(emb.device, torch.float32)


class TeacherStats:
    """Running mean, and with `whiten` the covariance, of teacher embeddings; identical on every rank.

    `transform(x)` maps teacher embeddings into the space the distillation target and the concept bank use:
    raw -> x;  centered -> x - mean;  whitened -> (x - mean) @ W with W the ZCA whitener of the running covariance,
    shrunk towards the isotropic (`shrinkage`).
    W is an eigendecomposition of a [d, d] matrix (seconds for d = 4096 on a CPU), so it is refreshed whenever the
    sample count has doubled since the last refresh: O(log n) refreshes over a run, each from twice the data.
    """

    def __init__(self, dim: int, target: str = "centered"):
        self.dim, self.target = dim, target
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64) if target == "whitened" else None
        self.whitener: torch.Tensor | None = None
        self.whitened_at = 0  # sample count when `whitener` was computed

    @property
    def mean(self) -> torch.Tensor:
        """float32 [d]; zeros before the first update."""
        return (self.sum / max(self.count, 1)).float()

    @torch.no_grad()
    def update(self, gathered: torch.Tensor) -> None:
        """Add a global batch [N, d] (the same tensor on every rank, e.g. all-gathered)."""
        x = gathered.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        if self.sum_outer is not None:
            self.sum_outer += x.T @ x
            if self.count >= 2 * self.whitened_at:
                self._refresh_whitener()

    def _refresh_whitener(self) -> None:
        mean = self.sum / self.count
        cov = self.sum_outer / self.count - torch.outer(mean, mean)
        eigval, eigvec = torch.linalg.eigh((cov + cov.T) / 2)
        eigval = eigval.clamp_min(0)
        s = shrinkage(self.count, self.dim)
        eigval = (1 - s) * eigval + s * eigval.mean()
        self.whitener = ((eigvec / eigval.sqrt()) @ eigvec.T).float()
        self.whitened_at = self.count

    def transform(self, emb: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings [n, d] in the target space (float32, not normalised)."""
        if self.target == "raw":
            return emb.float()
        x = centred(emb, self.mean)
        if self.target == "whitened" and self.whitener is not None:
            x = x @ self.whitener.to(x.device)
        return x

    def state_dict(self) -> dict:
        return {"target": self.target, "count": self.count, "sum": self.sum.clone(),
                "sum_outer": None if self.sum_outer is None else self.sum_outer.clone(),
                "whitener": None if self.whitener is None else self.whitener.clone(), "whitened_at": self.whitened_at}

    def load_state_dict(self, state: dict) -> None:
        if state["target"] != self.target or state["sum"].shape[0] != self.dim:
            raise ValueError(f"teacher statistics checkpoint is for target={state['target']!r}, dim={state['sum'].shape[0]}; "
                             f"this run has target={self.target!r}, dim={self.dim}")
        self.count, self.whitened_at = state["count"], state["whitened_at"]
        self.sum = state["sum"].clone()
        self.sum_outer = None if state["sum_outer"] is None else state["sum_outer"].clone()
        self.whitener = None if state["whitener"] is None else state["whitener"].clone()


def normalized_target(stats: TeacherStats, teacher_emb: torch.Tensor) -> torch.Tensor:
    """The unit-length distillation target: the teacher embedding in the stats' space, L2-normalised."""
    return F.normalize(stats.transform(teacher_emb), dim=-1)
