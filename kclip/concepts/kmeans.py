"""k-means for the concept bank: two backends with one contract, rows in, centroids out.

`faiss_kmeans` (faiss-cpu) is the CPU default. `torch_kmeans` runs Lloyd's iterations with torch on the rows' own
device, so a GPU rank clusters on its GPU without a faiss GPU build (whose wheels install the same `faiss` package as
faiss-cpu, so the two cannot sit side by side). `torch_kmeans` is faiss's algorithm, random draws included: start
from the given centroids or from k distinct rows drawn by a permutation seeded with the seed, then up to `niter` rounds
of assigning every row to its nearest centroid and moving each centroid to the mean of its rows (re-normalised when
spherical); a centroid left without rows is re-seeded by splitting a large cluster in two; stop early once a round
changes nothing. For one seed both backends start from the same rows and split the same clusters, so they give the same
fit up to float rounding (which can still tip a near-tie, and from there the fit). Both cluster every row they are
given (the caller samples) and return the centroids with the number of splits over all rounds.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
import torch
import torch.nn.functional as F

# faiss's relative perturbation of a split centroid's two halves ("a bit above machine epsilon for float16")
SPLIT_EPS = 1 / 1024
# faiss seeds the generator of each round's splits with this, whatever the k-means seed
SPLIT_SEED = 1234
UINT32_MAX = 2**32 - 1
# Rows per block of the assignment: its score matrix and one-hot are BLOCK_ROWS x k, whatever the number of rows.
BLOCK_ROWS = 8192


def resolve_backend(backend: str, device: torch.device) -> str:
    """`concepts.backend` for a fit on `device`: auto is torch on a GPU, faiss (faiss-cpu) on the CPU."""
    if backend == "auto":
        return "torch" if device.type == "cuda" else "faiss"
    return backend


def nearest(x: torch.Tensor, centroids: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Index of each row's nearest centroid [n] (long): largest inner product when spherical (unit rows and
    centroids), else smallest L2 distance; ties go to the lowest index, as in faiss."""
    return _assign(x, centroids, spherical)[0]


def _assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centroid per row [n], the sum of the rows' best scores: a scalar tensor that, like faiss's objective,
    changes from one round to the next unless the round changed nothing)."""
    sq_norms = None if spherical else (centroids * centroids).sum(dim=1)
    ids, total = [], x.new_zeros(())
    for block in x.split(BLOCK_ROWS):
        scores = block @ centroids.T
        # argmin ||x - c||^2 = argmax 2 x.c - ||c||^2: ||x||^2 is the same for every centroid of a row
        best, block_ids = (scores if spherical else 2 * scores - sq_norms).max(dim=1)
        ids.append(block_ids)
        total += best.sum()
    return torch.cat(ids), total


def faiss_kmeans(x: torch.Tensor, k: int, *, niter: int, seed: int, spherical: bool,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """faiss's k-means of the rows of `x` [n, d] on the CPU: (centroids [k, d] float32 on x's device, splits)."""
    rows = np.ascontiguousarray(x.detach().float().cpu().numpy())
    # A cap of n / k points per centroid keeps faiss from subsampling: every row given is clustered. A floor of 1
    # silences faiss's "please provide at least 39 x k training points", printed from C++ straight to the console:
    # the bank fits on what the warm-up gathered, by design (and the floor changes nothing else in faiss).
    kmeans = faiss.Kmeans(rows.shape[1], k, niter=niter, seed=seed, spherical=spherical,
                          max_points_per_centroid=math.ceil(len(rows) / k), min_points_per_centroid=1)
    kmeans.train(rows, init_centroids=None if init is None else init.detach().float().cpu().numpy())
    splits = int(sum(s["nsplit"] for s in kmeans.iteration_stats))
    return torch.from_numpy(kmeans.centroids).to(x.device), splits


def torch_kmeans(x: torch.Tensor, k: int, *, niter: int, seed: int, spherical: bool,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Lloyd's k-means of the rows of `x` [n, d] on x's device: (centroids [k, d] float32, splits). The random draws
    are made on the CPU, so a seed gives the same fit on any device (up to the device's float rounding)."""
    x = x.detach().float()
    if len(x) < k:
        raise ValueError(f"k-means of {len(x)} rows into {k} clusters: needs at least as many rows as clusters")
    if len(x) == k:  # faiss's corner case: every row is a centroid
        return x.clone(), 0
    if init is None:
        # faiss draws its starting rows by a Fisher-Yates shuffle on mt19937 seeded with seed + 1, which is what
        # torch's CPU randperm does with that seed (tests/test_kmeans_backends.py checks they pick the same rows).
        gen = torch.Generator().manual_seed(seed + 1)
        centroids = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)]
    else:
        centroids = init.detach().float().to(x.device)
    centroids = F.normalize(centroids, dim=1) if spherical else centroids
    splits, objective = 0, None
    for _ in range(niter):
        ids, score = _assign(x, centroids, spherical)
        previous, objective = objective, float(score)
        counts = torch.bincount(ids, minlength=k).float()
        centroids = _row_sums(x, ids, k) / counts.clamp_min(1)[:, None]
        counts = counts.cpu()
        if (counts == 0).any():
            centroids, done = _split_empty(centroids, counts, len(x))
            splits += done
        centroids = F.normalize(centroids, dim=1) if spherical else centroids
        if objective == previous:
            break  # as faiss (1.15) stops: the centroids did not move last round, so they will not move again
    return centroids, splits


def _row_sums(x: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the rows of `x` per id [k, d], as one-hot matmuls: index_add_ on CUDA adds in the order its atomics
    land, so the sums, and every later assignment, could differ from run to run."""
    sums = x.new_zeros(k, x.shape[1])
    for block, block_ids in zip(x.split(BLOCK_ROWS), ids.split(BLOCK_ROWS)):
        sums += F.one_hot(block_ids, k).to(x.dtype).T @ block
    return sums


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """faiss's re-seeding of empty clusters (`split_clusters`): each empty centroid becomes a copy of a cluster drawn
    with probability proportional to its size minus one (a single row cannot be split), both copies nudged apart by
    SPLIT_EPS in opposite directions, and the drawn cluster's count shared between the two. `counts` [k] float on the
    CPU; `n` rows in all. Returns the centroids and the number of splits."""
    centroids, counts = centroids.clone(), counts.numpy().astype(np.float32)
    # +SPLIT_EPS on even coordinates, -SPLIT_EPS on odd ones: faiss's symmetric perturbation
    nudge = SPLIT_EPS * (1 - 2 * (torch.arange(centroids.shape[1], device=centroids.device) % 2))
    rng = np.random.RandomState(SPLIT_SEED)  # mt19937 seeded as C++'s std::mt19937 is, like faiss's generator
    empty = np.flatnonzero(counts == 0).tolist()
    for ci in empty:
        cj = _draw_split_source(counts, n, rng)
        source = centroids[cj].clone()
        centroids[ci], centroids[cj] = source * (1 + nudge), source * (1 - nudge)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return centroids, len(empty)


def _draw_split_source(counts: np.ndarray, n: int, rng: np.random.RandomState) -> int:
    """faiss's draw of the cluster to split: visit the clusters in a cycle from 0 and take cluster j with probability
    (count_j - 1) / (n - k), one uniform draw per visit, in faiss's float32 arithmetic. Some cluster holds more than one
    row (n > k rows, a total that the sharing keeps, lie in fewer than k clusters), so the cycle ends."""
    k = len(counts)
    j = 0
    while True:
        p = np.float32((float(counts[j]) - 1.0) / float(np.float32(n - k)))
        r = np.float32(rng.randint(0, 2**32, dtype=np.uint32)) / np.float32(UINT32_MAX)
        if r < p:
            return j
        j = (j + 1) % k


KMEANS = {"faiss": faiss_kmeans, "torch": torch_kmeans}
