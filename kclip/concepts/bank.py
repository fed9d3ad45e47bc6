"""Concept bank: spherical k-means centroids over teacher caption embeddings, and the soft labels they induce.

The fit is collective: rank 0 gathers up to 256 x k rows sampled from all ranks' buffers, clusters them (seeded, so
deterministic; faiss on a CPU, torch on a GPU rank's device: kmeans.py) and broadcasts the centroids, so every rank
holds bit-identical ones. A re-fit is matched to the previous centroids (Hungarian assignment on cosine similarity) so
concept ids, which the concept heads are trained against, stay stable.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from kclip import dist
from kclip.concepts.kmeans import KMEANS, nearest, resolve_backend
from kclip.teacher.stats import centred

# faiss's default cap on training points per centroid (anything beyond it faiss would subsample away): the fit
# samples this many per centroid, whichever backend clusters them.
POINTS_PER_CENTROID = 256


def _match_to_previous(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Permutation `perm` maximising sum_i cos(old_i, new_perm[i]); also the number of ids not matched to themselves
    and the mean drift 1 - cos(old_i, new_perm[i]) after matching."""
    old_n = old / np.linalg.norm(old, axis=1, keepdims=True)
    new_n = new / np.linalg.norm(new, axis=1, keepdims=True)
    cos = old_n @ new_n.T
    rows, perm = linear_sum_assignment(cos, maximize=True)  # rows == arange(k) for a square matrix
    moved = int((perm != rows).sum())
    drift = float((1 - cos[rows, perm]).mean())
    return perm, moved, drift


class ConceptBank:
    """k centroids in teacher-embedding space (k-means on L2-normalised embeddings when spherical)."""

    def __init__(self, k: int, dim: int, *, niter: int = 20, seed: int = 0, spherical: bool = True,
                 warm_start: bool = True, center: bool = True, backend: str = "auto"):
        self.k, self.dim, self.niter, self.seed, self.spherical = k, dim, niter, seed, spherical
        self.backend = backend  # concepts.backend: auto | faiss | torch
        # Decoder-LM embeddings are anisotropic: all captions sit in a narrow cone (cosines of 0.9+ between unrelated
        # captions), so cosine similarity to centroids barely varies and softmax(sim / tau) is close to uniform,
        # i.e. the soft labels carry almost no signal. Subtracting the mean of the fitted embeddings first spreads
        # them out (measured on the demo: label entropy 3.26 -> 0.53 nats against 3.47 for uniform, k=32, tau=0.05).
        self.center = center
        self.mean = torch.zeros(dim)
        # Re-fits start from the current centroids: the frozen teacher's embedding distribution barely shifts between
        # recomputes, so this converges faster, avoids a fresh random start's worse local optima, and keeps ids put
        # (the Hungarian matching below still guards against any swap).
        self.warm_start = warm_start
        self.centroids: torch.Tensor | None = None  # [k, dim] float32, identical on every rank
        self.num_fits = 0

    @property
    def fitted(self) -> bool:
        return self.centroids is not None

    def _cluster(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Rank-0 work: k-means on all rows, re-aligned to the previous centroids; returns centroids and stats."""
        backend = resolve_backend(self.backend, dist.device())
        # torch clusters on this rank's device, faiss on the CPU, wherever the rows come from (training's buffers
        # keep them on the CPU).
        x = x.to(dist.device() if backend == "torch" else "cpu")
        init = self.centroids if self.warm_start and self.fitted else None
        centroids, empty = KMEANS[backend](x, self.k, niter=self.niter, seed=self.seed, spherical=self.spherical,
                                           init=init)
        moved, drift = 0, 0.0
        if self.fitted:
            perm, moved, drift = _match_to_previous(self.centroids.cpu().numpy(), centroids.cpu().numpy())
            centroids = centroids[torch.from_numpy(perm).to(x.device)]
        sizes = torch.bincount(nearest(x, centroids, self.spherical), minlength=self.k).tolist()
        stats = {"moved_ids": moved, "drift": drift, "empty": empty, "sizes": sizes, "points": len(x)}
        return centroids, stats

    def fit(self, local_embeddings: torch.Tensor, mean: torch.Tensor | None = None) -> dict:
        """Collective (every rank calls it): fit on the rows of all ranks and return the stats (same on all ranks).

        `mean` (identical on every rank): what to centre on, i.e. the running teacher mean that the distillation
        target is centred with (`TeacherStats.mean`), so concepts and distillation live in one space. Without it the
        bank centres on the mean of the rows it clusters. Either way the mean is a snapshot taken at the fit: the
        centroids are defined relative to it, and moving it between fits would shift every soft label.

        stats: moved_ids (ids whose Hungarian match to the previous fit was not themselves; 0 on the first fit),
        drift (mean 1 - cos(old_i, new_i) after matching; 0 on the first fit), empty (clusters found empty and
        re-seeded by splitting a large one, summed over iterations), sizes (points per concept in the final
        assignment), points (rows clustered: all buffered rows, or a sample of 256 x k of them), seconds.
        """
        start = time.perf_counter()
        if local_embeddings.ndim != 2 or local_embeddings.shape[1] != self.dim:
            raise ValueError(f"concept bank expects [n, {self.dim}] embeddings, got {list(local_embeddings.shape)}")
        # Raw rows, prepared below exactly as `soft_labels` prepares them (centre, then normalise): normalising before
        # centring here would fit centroids in a different space from the one the labels are computed in.
        x = local_embeddings.detach().float()
        # k-means gets at most POINTS_PER_CENTROID x k rows, so each rank sends only its share of that to rank 0:
        # memory and traffic stay flat as ranks and buffers grow.
        x = self._subsample(x, math.ceil(POINTS_PER_CENTROID * self.k / dist.world_size()))
        rows, total = dist.gather_rows(x)
        # Every rank knows the gathered count, so every rank raises here together: no rank is left waiting.
        if self.k > total:
            raise ValueError(
                f"concepts.k={self.k} exceeds the {total} teacher embeddings available for the fit "
                "(lower concepts.k or raise concepts.warmup_steps / concepts.buffer_size)"
            )
        if not self.center:
            self.mean = torch.zeros(self.dim)
        elif mean is not None:
            self.mean = mean.detach().float().cpu().clone()
        else:
            own = rows.mean(dim=0) if dist.is_main() else torch.zeros(self.dim, device=rows.device)
            self.mean = dist.broadcast(own.contiguous()).cpu()  # rank 0's: bit-identical everywhere
        rows = self.prepare(rows)
        stats = None
        centroids = torch.empty(self.k, self.dim, dtype=torch.float32, device=x.device)
        if dist.is_main():
            fitted, stats = self._cluster(rows)
            centroids.copy_(fitted)
        dist.broadcast(centroids)
        stats = dist.broadcast_object(stats)
        self.centroids = centroids
        self.num_fits += 1
        stats["seconds"] = time.perf_counter() - start
        return stats

    def _subsample(self, x: torch.Tensor, limit: int) -> torch.Tensor:
        """At most `limit` rows of `x`, drawn without replacement by a generator seeded per (seed, fit, rank), so a
        resumed run draws the same rows."""
        if x.shape[0] <= limit:
            return x
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.num_fits) * 65_537 + dist.rank())
        return x[torch.randperm(x.shape[0], generator=gen)[:limit].to(x.device)]

    def _require_fitted(self) -> torch.Tensor:
        if self.centroids is None:
            raise RuntimeError("concept bank used before its first fit")
        return self.centroids

    def prepare(self, emb: torch.Tensor) -> torch.Tensor:
        """Teacher rows [n, dim] into the space the centroids live in (for fits, labels, and anything drawn beside the
        centroids): centred on the fitted mean, then L2-normalised when spherical."""
        x = centred(emb, self.mean)
        return F.normalize(x, dim=1) if self.spherical else x

    @torch.no_grad()
    def soft_labels(self, teacher_emb: torch.Tensor, tau: float) -> torch.Tensor:
        """q = softmax(prepare(t) @ centroids.T / tau), [B, k] float32, with prepare(t) = normalize(t - mean);
        rows sum to 1."""
        centroids = self._require_fitted().to(teacher_emb.device)
        return torch.softmax(self.prepare(teacher_emb) @ centroids.T / tau, dim=1)

    @torch.no_grad()
    def assign(self, emb: torch.Tensor) -> torch.Tensor:
        """Hard concept id per row [B] (long): nearest centroid by cosine (spherical) or L2 distance."""
        return nearest(self.prepare(emb), self._require_fitted().to(emb.device), self.spherical)

    def state_dict(self) -> dict:
        return {
            "centroids": None if self.centroids is None else self.centroids.cpu().clone(),
            "mean": self.mean.clone(),
            "num_fits": self.num_fits,
            "config": {"k": self.k, "dim": self.dim, "niter": self.niter, "seed": self.seed,
                       "spherical": self.spherical},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["config"]
        if (saved["k"], saved["dim"]) != (self.k, self.dim):
            raise ValueError(
                f"concept bank checkpoint has k={saved['k']}, dim={saved['dim']}; this run has k={self.k}, "
                f"dim={self.dim}"
            )
        centroids = state["centroids"]
        self.centroids = None if centroids is None else centroids.to(torch.float32).clone()
        self.mean = state["mean"].float().clone()
        self.num_fits = state["num_fits"]
