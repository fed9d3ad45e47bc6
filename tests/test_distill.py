"""Distillation targets and forms: a constant prediction must not pay, the gathered forms equal their single-process
full-batch versions in loss and gradient, and the running teacher statistics are exact and round-trip."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks

from kclip.losses import (
    distillation_mean_baseline,
    distillation_term,
    relational_distillation,
)
from kclip.teacher.stats import TeacherStats, normalized_target

WORLD, B, D, TAU = 2, 6, 24, 0.1


def anisotropic_teacher(n: int = WORLD * B, seed: int = 0) -> torch.Tensor:
    """Unit vectors in a narrow cone, like mean-pooled decoder-LM states (SmolLM2: mean cosine 0.94 to the mean)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.zeros(D)
    common[0] = 1.0
    return F.normalize(common + 0.35 * F.normalize(torch.randn(n, D, generator=g), dim=1), dim=1)


def targets(target: str, teacher: torch.Tensor) -> torch.Tensor:
    stats = TeacherStats(D, target)
    stats.update(teacher)
    return normalized_target(stats, teacher)


FORMS = [("cosine", "centered"), ("mse", "centered"), ("cosine", "whitened"), ("relational", "centered"),
         ("contrastive", "centered"), ("relational", "raw"), ("contrastive", "raw")]


def uninformed_loss(kind: str, target: torch.Tensor, draws: int = 50) -> float:
    """The mean loss of predictions that know nothing about their caption: random directions (the student side of
    the relational form is compared only through similarities, so random directions there too)."""
    g = torch.Generator().manual_seed(1)
    return float(np.mean([distillation_term(kind, torch.randn(target.shape, generator=g), target, TAU).item()
                          for _ in range(draws)]))


def uniform_guess_relational_loss(target: torch.Tensor, tau: float) -> float:
    """mean_i KL(p^T_i || uniform over the N - 1 other captions), in float64 from the cosines."""
    t = F.normalize(target.double(), dim=1)
    n = len(t)
    total = 0.0
    for i in range(n):
        logits = torch.cat([t[:i], t[i + 1:]]) @ t[i] / tau
        p = torch.softmax(logits, dim=0)
        total += math.log(n - 1) + float((p * torch.log(p)).sum())
    return total / n


@pytest.mark.parametrize("kind,target", FORMS)
def test_predicting_the_mean_scores_no_better_than_knowing_nothing(kind, target):
    t = targets(target, anisotropic_teacher())
    mean_loss = distillation_mean_baseline(kind, t, TAU).item()
    chance = uninformed_loss(kind, t)
    perfect = distillation_term(kind, t, t, TAU).item()
    if kind == "relational":
        # Chance for a batch-level form is a uniform guess over the other captions (random directions are worse: they
        # add confident, wrong structure): KL(p^T_i || uniform) = log(N - 1) - H(p^T_i), written out here from the
        # teacher's similarities alone, so a baseline that is not a constant student, or a form that lets a caption
        # compare with itself (uniform over N: log N - H), misses it.
        chance = uniform_guess_relational_loss(t, TAU)
        assert mean_loss == pytest.approx(chance, abs=1e-5)
    if kind == "contrastive":
        # A constant prediction is at least as bad as a uniform guess, log N (Jensen on its log-sum-exp).
        chance = math.log(len(t))
    assert mean_loss >= chance - 0.05 * (chance - perfect), (mean_loss, chance, perfect)
    assert perfect < chance


def test_raw_cosine_targets_are_satisfied_by_the_mean():
    """The failure the centred targets fix: with raw anisotropic targets the constant mean direction is nearly
    perfect under the cosine form."""
    t = targets("raw", anisotropic_teacher())
    assert distillation_mean_baseline("cosine", t, TAU).item() < 0.1 < 0.5 < uninformed_loss("cosine", t)


def test_relational_matches_an_explicit_kl():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 9, generator=g)
    got = relational_distillation(s, s, t, t, 0.5, 0).item()
    want = 0.0
    for i in range(5):
        others = [j for j in range(5) if j != i]
        cos_s = F.cosine_similarity(s[i][None], s[others], dim=1) / 0.5
        cos_t = F.cosine_similarity(t[i][None], t[others], dim=1) / 0.5
        want += F.kl_div(F.log_softmax(cos_s, 0), F.log_softmax(cos_t, 0), log_target=True, reduction="sum").item()
    assert got == pytest.approx(want / 5, abs=1e-6)


def _student_problem():
    """A linear 'projector' over fixed student features, and raw teacher embeddings, for the whole global batch."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD * B, 10, generator=g), torch.randn(D, 10, generator=g), anisotropic_teacher()


def _loss_and_grads(kind, target, rows):
    """Loss and weight gradient for `rows` of the global batch; the statistics see the whole global batch (on ranks,
    by an all-gather of the local rows, as the training loop does)."""
    from kclip import dist

    features, weight0, teacher = _student_problem()
    stats = TeacherStats(D, target)
    stats.update(dist.all_gather_rows(teacher[rows]))
    weight = weight0.clone().requires_grad_()
    loss = distillation_term(kind, features[rows] @ weight.T, normalized_target(stats, teacher[rows]), TAU)
    loss.backward()
    return loss.item(), weight.grad.numpy(), stats.mean.numpy()


def _on_ranks(forms):
    from kclip import dist

    rows = slice(dist.rank() * B, (dist.rank() + 1) * B)
    return {form: _loss_and_grads(*form, rows) for form in forms}


GATHERED_FORMS = [("cosine", "centered"), ("cosine", "whitened"), ("relational", "centered"),
                  ("contrastive", "centered")]


def test_two_ranks_equal_one_process_in_loss_and_gradient():
    """Each rank's gradient is world x d(global mean loss)/dW (DeepSpeed then averages over ranks); the mean of the
    ranks' losses is the global loss; both ranks hold the statistics of the whole global batch."""
    per_rank = run_ranks(_on_ranks, GATHERED_FORMS, world_size=WORLD)
    for form in GATHERED_FORMS:
        ref_loss, ref_grad, ref_mean = _loss_and_grads(*form, slice(None))
        (loss0, grad0, mean0), (loss1, grad1, mean1) = per_rank[0][form], per_rank[1][form]
        assert (loss0 + loss1) / WORLD == pytest.approx(ref_loss, abs=1e-5), form
        np.testing.assert_allclose((grad0 + grad1) / WORLD, ref_grad, atol=1e-5, err_msg=str(form))
        np.testing.assert_array_equal(mean0, mean1)
        np.testing.assert_allclose(mean0, ref_mean, atol=1e-7)


def test_statistics_are_exact_running_moments():
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(3)) @ torch.randn(D, D) + 3.0
    stats = TeacherStats(D, "whitened")
    for chunk in x.split(64):
        stats.update(chunk)
    torch.testing.assert_close(stats.mean, x.mean(0), atol=1e-5, rtol=0)
    # The whitener is refreshed at 64, 128, 256 samples (doubling), then kept until 512.
    assert stats.whitened_at == 256 and stats.count == 400
    # ZCA of the first 256 samples' covariance shrunk towards its mean eigenvalue by d / (256 + d).
    seen = x[:256].double()
    cov = torch.cov(seen.T, correction=0)
    s = D / (256 + D)
    eigval, eigvec = torch.linalg.eigh((1 - s) * cov + s * torch.trace(cov) / D * torch.eye(D, dtype=torch.float64))
    torch.testing.assert_close(stats.whitener, ((eigvec / eigval.sqrt()) @ eigvec.T).float(), atol=1e-4, rtol=1e-4)
    # Whitened, shrunk: no direction's variance above 1 / (1 - s), the strong ones near it.
    variances = torch.linalg.eigvalsh(torch.cov(stats.transform(x[:256]).double().T, correction=0))
    assert variances.max() <= 1 / (1 - s) + 1e-4 and variances.max() > 1.0
    centered = TeacherStats(D, "centered")
    centered.update(x)
    torch.testing.assert_close(centered.transform(x).mean(0), torch.zeros(D), atol=1e-4, rtol=0)
    assert centered.sum_outer is None  # no covariance kept when it is not used


def test_the_first_whitener_on_fewer_rows_than_dimensions_does_not_amplify_what_they_never_saw():
    """SmolLM2's width and one global batch of the demo: 64 rows in 576 dimensions, anisotropic as its embeddings are.
    A direction outside the rows' span must not be scaled far above the ones they span."""
    g = torch.Generator().manual_seed(0)
    d, n = 576, 64
    x = torch.randn(n, d, generator=g) * torch.linspace(3.0, 0.1, d) + 1.0
    stats = TeacherStats(d, "whitened")
    stats.update(x)
    assert stats.whitened_at == n
    _, _, vh = torch.linalg.svd((x - x.mean(0)).double(), full_matrices=True)
    inside, outside = vh[0].float(), vh[-1].float()  # the rows' top direction, and one orthogonal to all of them

    def gain(v):
        return float((v @ stats.whitener).norm())

    assert gain(outside) / gain(inside) < 4.0, (gain(outside), gain(inside))


def test_statistics_state_round_trips_bitwise():
    x = anisotropic_teacher(100)
    stats = TeacherStats(D, "whitened")
    stats.update(x[:70])
    restored = TeacherStats(D, "whitened")
    restored.load_state_dict(stats.state_dict())
    stats.update(x[70:])
    restored.update(x[70:])
    assert torch.equal(stats.transform(x), restored.transform(x)) and restored.count == 100
    with pytest.raises(ValueError, match="target='whitened'"):
        TeacherStats(D, "centered").load_state_dict(stats.state_dict())
