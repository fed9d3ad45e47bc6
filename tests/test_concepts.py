import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks

from kclip.concepts.bank import ConceptBank

DIM, K = 16, 4


def _clustered(seed: int = 1, per: int = 30, noise: float = 0.05):
    """K tight clusters around random unit directions; returns points and their true cluster."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(K, DIM, generator=g), dim=1)
    labels = torch.arange(K).repeat_interleave(per)
    return centers[labels] + noise * torch.randn(len(labels), DIM, generator=g), labels


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two labellings split the points identically (up to renaming the ids)."""
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def _rank_fits():
    """On 2 ranks: a fit on unequal shares (70 and 50 rows), then a fit with k above the gathered row count."""
    from kclip import dist

    x, _ = _clustered()
    bank = ConceptBank(K, DIM, seed=0)
    stats = bank.fit(x[:70] if dist.rank() == 0 else x[70:])
    stats.pop("seconds")
    too_many = ConceptBank(50, DIM)
    try:
        too_many.fit(torch.randn(10 + dist.rank(), DIM))
    except ValueError as err:
        message = str(err)
    in_step = dist.all_reduce_sum(torch.ones(1)).item() == 2  # a later collective still completes on both ranks
    return bank.centroids.numpy(), stats, message, in_step, too_many.fitted


def test_two_rank_fits():
    (c0, s0, *rest0), (c1, s1, *rest1) = run_ranks(_rank_fits, timeout=120)
    np.testing.assert_array_equal(c0, c1)
    assert s0 == s1
    single = ConceptBank(K, DIM, seed=0)
    single.fit(_clustered()[0])  # same rows in the same (rank) order as the gathered ones
    np.testing.assert_array_equal(c0, single.centroids.numpy())
    assert sorted(s0["sizes"]) == [30] * K and s0["empty"] == 0 and s0["moved_ids"] == 0
    # k > N: every rank raises the same error and none is left hanging in a collective.
    for message, in_step, fitted in (rest0, rest1):
        assert message.startswith("concepts.k=50 exceeds the 21 teacher embeddings available for the fit")
        assert in_step and not fitted


def _capped_fits():
    """On 2 ranks, 1000 rows each but k=2: each rank sends only 256 (faiss would use at most 256 x k = 512)."""
    from kclip import dist

    x = torch.randn(1000, DIM, generator=torch.Generator().manual_seed(dist.rank()))
    first, again = ConceptBank(2, DIM, seed=0), ConceptBank(2, DIM, seed=0)
    return first.fit(x)["points"], first.centroids.numpy(), again.fit(x)["points"], again.centroids.numpy()


def test_fit_gathers_at_most_256_rows_per_centroid_deterministically():
    (points, c0, points_again, c0_again), (_, c1, _, _) = run_ranks(_capped_fits, timeout=120)
    assert points == points_again == 512
    np.testing.assert_array_equal(c0, c1)  # identical on every rank
    np.testing.assert_array_equal(c0, c0_again)  # the sample is seeded: a resumed run draws the same rows


def test_refit_from_random_starts_is_matched_back_to_the_same_ids():
    x, truth = _clustered()
    bank = ConceptBank(K, DIM, seed=0, warm_start=False)
    bank.fit(x)
    first_state, first_centroids, first_ids = bank.state_dict(), bank.centroids.clone(), bank.assign(x)
    assert _same_partition(first_ids, truth), "fixture: the first fit should recover the true clusters"
    relabelled = 0
    for perm_seed in range(5):
        bank.load_state_dict(first_state)  # each re-fit is matched against the first fit
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(perm_seed))
        stats = bank.fit(x[perm])
        if not _same_partition(bank.assign(x), truth):
            continue  # k-means from a random start may land in another local optimum; nothing to match then
        relabelled += stats["moved_ids"] > 0
        torch.testing.assert_close(bank.centroids, first_centroids, atol=1e-5, rtol=0)
        assert torch.equal(bank.assign(x), first_ids)
        assert stats["drift"] < 1e-5
    assert relabelled > 0, "no re-fit produced new ids, so the matching was never exercised"
    assert bank.num_fits == 2


def test_empty_clusters_are_reseeded_and_reported():
    # 3 distinct points, each repeated: any 4th+ centroid sampled on a duplicate ends an iteration empty.
    distinct = F.normalize(torch.randn(3, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    bank = ConceptBank(5, DIM, niter=5, seed=0)
    stats = bank.fit(distinct.repeat(20, 1))
    assert stats["empty"] >= 2
    assert sum(stats["sizes"]) == 60 and len(stats["sizes"]) == 5
    assert torch.isfinite(bank.centroids).all()


def test_soft_labels_and_assign():
    # Off-centre, loose clusters and a warm temperature: the labels are far from one-hot (mean top probability
    # 0.68), so centring before normalising moves them a lot; with tight clusters and tau=0.05 both formulas give
    # the same saturated labels and a missing centring would go unnoticed.
    x = _clustered(noise=0.2)[0] + 1.0
    bank = ConceptBank(K, DIM, seed=0)
    with pytest.raises(RuntimeError, match="before its first fit"):
        bank.soft_labels(x, tau=0.1)
    bank.fit(x)
    tau = 0.5
    q = bank.soft_labels(x, tau)
    assert q.shape == (len(x), K) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(dim=1), torch.ones(len(x)))
    assert q.max(dim=1).values.mean() < 0.75
    assert torch.equal(q.argmax(dim=1), bank.assign(x))
    centred = torch.softmax(F.normalize(x - x.mean(dim=0), dim=1) @ bank.centroids.T / tau, dim=1)
    torch.testing.assert_close(q, centred)
    uncentred = torch.softmax(F.normalize(x, dim=1) @ bank.centroids.T / tau, dim=1)
    assert (q - uncentred).abs().sum(dim=1).mean() > 0.5  # L1 distance between the two label distributions, of 2
    # Only the direction from the mean counts: rows are normalised after centring.
    torch.testing.assert_close(bank.soft_labels(x.mean(dim=0) + 7.0 * (x - x.mean(dim=0)), tau), q)
    assert bank.soft_labels(x, tau=1e-3).max(dim=1).values.min() > 0.99  # low temperature: nearly one-hot


def test_state_dict_round_trip():
    x, _ = _clustered()
    bank = ConceptBank(K, DIM, seed=0)
    empty = ConceptBank(K, DIM)
    empty.load_state_dict(bank.state_dict())
    assert not empty.fitted
    bank.fit(x)
    restored = ConceptBank(K, DIM)
    restored.load_state_dict(bank.state_dict())
    assert restored.fitted and restored.num_fits == 1
    assert torch.equal(restored.centroids, bank.centroids)
    assert torch.equal(restored.soft_labels(x, 0.1), bank.soft_labels(x, 0.1))
    with pytest.raises(ValueError, match="k=4, dim=16; this run has k=5"):
        ConceptBank(5, DIM).load_state_dict(bank.state_dict())


def test_fit_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"expects \[n, 16\]"):
        ConceptBank(K, DIM).fit(torch.randn(10, 8))


def test_warm_started_refit_keeps_ids_without_relabelling():
    x, truth = _clustered()
    bank = ConceptBank(K, DIM, seed=0)
    bank.fit(x)
    first_ids = bank.assign(x)
    for perm_seed in range(3):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(perm_seed))
        stats = bank.fit(x[perm])
        assert stats["moved_ids"] == 0 and stats["drift"] < 1e-5
        assert torch.equal(bank.assign(x), first_ids)


def test_centering_gives_informative_soft_labels_for_anisotropic_embeddings():
    """Decoder-LM embeddings share a large common direction; without centring, every caption is about equally
    similar to every centroid and the soft labels are nearly uniform."""
    g = torch.Generator().manual_seed(0)
    offset = torch.zeros(DIM)
    offset[0] = 20.0  # the common direction dominates every embedding, as in SmolLM2's mean-pooled states
    x = torch.randn(K, DIM, generator=g).repeat_interleave(30, dim=0) + offset + 0.1 * torch.randn(30 * K, DIM, generator=g)
    entropy = {}
    for center in (False, True):
        bank = ConceptBank(K, DIM, seed=0, center=center)
        bank.fit(x)
        q = bank.soft_labels(x, tau=0.05)
        entropy[center] = float(-(q * q.clamp_min(1e-12).log()).sum(1).mean())
    uniform = math.log(K)
    assert entropy[False] > 0.9 * uniform and entropy[True] < 0.25 * uniform, entropy


def test_labels_are_computed_in_the_space_the_centroids_were_fitted_in():
    """Unnormalised teacher embeddings (teacher.normalize=false) of very different norms: the fit and the soft labels
    must prepare rows the same way (centre, then normalise), or the labels disagree with the fit's own clusters."""
    x, _ = _clustered(per=40, noise=0.3)
    norms = torch.linspace(0.2, 30.0, len(x))[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    x = x * norms[:, None] + 2.0
    bank = ConceptBank(K, DIM, seed=0)
    stats = bank.fit(x)
    assert np.bincount(bank.soft_labels(x, tau=1e-3).argmax(1).numpy(), minlength=K).tolist() == stats["sizes"]


def test_the_shared_running_mean_is_what_the_bank_centres_on():
    x, _ = _clustered()
    mean = torch.full((DIM,), 0.25)
    bank = ConceptBank(K, DIM, seed=0)
    bank.fit(x, mean=mean)
    assert torch.equal(bank.mean, mean)
    expected = torch.softmax(F.normalize(x - mean, dim=1) @ bank.centroids.T / 0.1, dim=1)
    torch.testing.assert_close(bank.soft_labels(x, 0.1), expected)
