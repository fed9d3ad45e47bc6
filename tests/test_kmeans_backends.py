"""The torch k-means (what a GPU rank's concept fit runs) against faiss's, on the CPU through the same device-agnostic
code: the same clusters on separated data, the same Lloyd steps from the same start, a comparable objective on random
data, one fit per seed, empty clusters re-seeded and counted alike; and the choice of backend."""
import pytest
import torch
import torch.nn.functional as F
from test_concepts import DIM, K, _clustered, _same_partition

from kclip.concepts.bank import ConceptBank, _match_to_previous
from kclip.concepts.kmeans import faiss_kmeans, nearest, resolve_backend, torch_kmeans
from kclip.config import ConfigError
from kclip.config.schema import ConceptConfig, check_section

BACKENDS = {"faiss": faiss_kmeans, "torch": torch_kmeans}


def _inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum over rows of the squared L2 distance to the nearest centroid (the k-means objective)."""
    return float(torch.cdist(x.double(), centroids.double()).min(dim=1).values.pow(2).sum())


def _random(n: int = 2000, dim: int = 32, spherical: bool = True, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(x, dim=1) if spherical else x


@pytest.mark.parametrize("spherical", [True, False])
def test_for_a_seed_both_backends_start_from_the_same_rows(spherical):
    x = _random(spherical=spherical)
    for seed in (0, 1, 12345, 2**31 - 2):  # up to the largest seed the config accepts, less one (faiss adds 1)
        starts = [kmeans(x, 16, niter=0, seed=seed, spherical=spherical)[0] for kmeans in BACKENDS.values()]
        torch.testing.assert_close(*starts, atol=1e-6, rtol=0)  # the same rows, each normalised its own way


@pytest.mark.parametrize("spherical", [True, False])
def test_both_backends_find_the_same_clusters_on_separated_data(spherical):
    """A single random start lands in a local optimum for ~40% of seeds here (two starting rows in one cluster), with
    either backend alike: they start from the same rows and take the same steps, splits included."""
    x, truth = _clustered()
    x = F.normalize(x, dim=1) if spherical else x
    found_truth = 0
    for seed in range(8):
        fitted = {name: kmeans(x, K, niter=20, seed=seed, spherical=spherical) for name, kmeans in BACKENDS.items()}
        ids = {name: nearest(x, centroids, spherical) for name, (centroids, _) in fitted.items()}
        assert _same_partition(ids["torch"], ids["faiss"]), seed
        assert fitted["torch"][1] == fitted["faiss"][1], seed
        perm, _, _ = _match_to_previous(fitted["faiss"][0].numpy(), fitted["torch"][0].numpy())
        torch.testing.assert_close(fitted["torch"][0][torch.from_numpy(perm)], fitted["faiss"][0], atol=1e-5, rtol=0)
        found_truth += _same_partition(ids["torch"], truth)
    assert found_truth >= 4


@pytest.mark.parametrize("spherical", [True, False])
def test_from_the_same_start_both_take_the_same_lloyd_steps(spherical):
    x = _random(spherical=spherical)
    init = x[:16]  # rows of random data: no cluster ends a round empty
    fitted = {name: kmeans(x, 16, niter=5, seed=0, spherical=spherical, init=init) for name, kmeans in BACKENDS.items()}
    assert fitted["faiss"][1] == fitted["torch"][1] == 0
    torch.testing.assert_close(fitted["torch"][0], fitted["faiss"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("spherical", [True, False])
def test_objective_on_random_data_is_within_half_a_percent_of_faiss(spherical):
    x = _random(spherical=spherical)
    inertia = {name: sum(_inertia(x, kmeans(x, 16, niter=20, seed=seed, spherical=spherical)[0]) for seed in range(4))
               for name, kmeans in BACKENDS.items()}
    assert abs(inertia["torch"] / inertia["faiss"] - 1) < 5e-3, inertia


def test_torch_kmeans_is_one_fit_per_seed():
    x = _random()
    first, again, other = (torch_kmeans(x, 16, niter=10, seed=seed, spherical=True) for seed in (3, 3, 4))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], other[0])


def _three_groups(noise: float, seed: int = 0) -> torch.Tensor:
    """20 unit rows around each of 3 random directions (`noise` 0: 3 distinct rows, each 20 times)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(3, DIM, generator=g), dim=1)
    return F.normalize(centers.repeat_interleave(20, dim=0) + noise * torch.randn(60, DIM, generator=g), dim=1)


def test_empty_clusters_are_split_as_faiss_splits_them():
    """Two starting centroids opposite to two of the groups end round one empty: both backends draw the same clusters
    to split and nudge the same halves apart. Later rounds share each split group between its two halves, whose
    boundary runs through the group: a row on it may go either way. (Not duplicated starting rows: which of two equal
    centroids a row joins depends on the last bit of a matrix product, which differs between CPUs' kernels.)"""
    for seed in range(4):
        x = _three_groups(noise=0.01, seed=seed)
        init = torch.cat([x[[0, 20, 40]], -x[[0, 20]]])
        (faiss_centroids, faiss_splits), (torch_centroids, torch_splits) = (
            kmeans(x, 5, niter=1, seed=0, spherical=True, init=init) for kmeans in BACKENDS.values())
        assert faiss_splits == torch_splits == 2
        torch.testing.assert_close(torch_centroids, faiss_centroids, atol=1e-6, rtol=0)
        splits = [kmeans(x, 5, niter=10, seed=0, spherical=True, init=init)[1] for kmeans in BACKENDS.values()]
        assert splits[0] == splits[1], seed


def test_clusters_that_stay_empty_are_counted_every_round():
    # 3 distinct rows into 5 clusters: every round leaves at least 2 centroids without rows, for at least 2 rounds
    # (a fit stops after the first round that repeats the objective of the one before).
    x = _three_groups(noise=0.0)
    for name, kmeans in BACKENDS.items():
        centroids, splits = kmeans(x, 5, niter=5, seed=0, spherical=True)
        assert splits >= 2 * 2, name
        assert torch.isfinite(centroids).all()
        assert sorted(torch.bincount(nearest(x, centroids, True), minlength=5).tolist()) == [0, 0, 20, 20, 20], name


def test_as_many_rows_as_clusters_are_the_centroids_and_fewer_are_refused():
    x = torch.randn(K, DIM, generator=torch.Generator().manual_seed(0))
    for kmeans in BACKENDS.values():
        centroids, splits = kmeans(x, K, niter=3, seed=0, spherical=True)
        assert torch.equal(centroids, x) and splits == 0
    with pytest.raises(ValueError, match="k-means of 3 rows into 4 clusters"):
        torch_kmeans(x[:3], K, niter=3, seed=0, spherical=False)


def test_a_torch_bank_fits_alone_and_refits_a_faiss_banks_concepts_in_place():
    x, truth = _clustered()
    fresh = [ConceptBank(K, DIM, seed=0, backend="torch") for _ in range(2)]
    first = [bank.fit(x) for bank in fresh]
    assert first[0]["points"] == len(x) and sum(first[0]["sizes"]) == len(x) and len(first[0]["sizes"]) == K
    assert torch.equal(fresh[0].centroids, fresh[1].centroids) and first[0]["empty"] == first[1]["empty"]
    torch.testing.assert_close(fresh[0].centroids.norm(dim=1), torch.ones(K))
    # A run fitted by faiss on the CPU, resumed on a GPU: the torch re-fit starts from faiss's centroids, keeps ids.
    cpu_bank = ConceptBank(K, DIM, seed=0, backend="faiss")
    cpu_bank.fit(x)
    assert _same_partition(cpu_bank.assign(x), truth)
    gpu_bank = ConceptBank(K, DIM, seed=0, backend="torch")
    gpu_bank.load_state_dict(cpu_bank.state_dict())
    stats = gpu_bank.fit(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))])
    assert stats["moved_ids"] == 0 and stats["drift"] < 1e-5 and stats["empty"] == 0
    assert sorted(stats["sizes"]) == [30] * K
    assert torch.equal(gpu_bank.assign(x), cpu_bank.assign(x))
    torch.testing.assert_close(gpu_bank.centroids, cpu_bank.centroids, atol=1e-5, rtol=0)


def test_auto_is_torch_on_a_gpu_and_faiss_on_the_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend("auto", cpu) == "faiss" and resolve_backend("auto", gpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch" and resolve_backend("faiss", gpu) == "faiss"
    with pytest.raises(ConfigError, match=r"^concepts.backend: 'gpu' is not one of \['auto', 'faiss', 'torch'\]$"):
        check_section(ConceptConfig(backend="gpu"), "concepts.")
