import math

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks

from kclip.config import LossConfig
from kclip.losses import (
    KnowledgeCLIPLoss,
    _TiledLogSumExp,
    concept_loss,
    contrastive_loss,
    distillation_loss,
)

WORLD, B, E_IN, E = 2, 5, 6, 8
VARIANTS = [("full", 0), ("local", 0), ("full", 3), ("local", 3)]  # chunk 3 does not divide b=5 nor N=10


def _problem(seed: int = 0):
    """A global batch of 2B raw features, a shared linear 'tower' and a logit scale."""
    g = torch.Generator().manual_seed(seed)
    x_img, x_txt = torch.randn(WORLD * B, E_IN, generator=g), torch.randn(WORLD * B, E_IN, generator=g)
    weight = torch.randn(E, E_IN, generator=g)
    return x_img, x_txt, weight, torch.tensor([math.log(10.0)])  # shape [1], like the student's parameter


def _forward(x_img, x_txt, weight, log_scale):
    """Normalised embeddings through the tower; returns leaf parameters and the embeddings (grads retained)."""
    weight = weight.clone().requires_grad_()
    log_scale = log_scale.clone().requires_grad_()
    img, txt = F.normalize(x_img @ weight.T, dim=1), F.normalize(x_txt @ weight.T, dim=1)
    img.retain_grad()
    txt.retain_grad()
    return weight, log_scale, img, txt


def _reference():
    """Single process, plain cross-entropy over the full [2B, 2B] logits: loss and gradients."""
    weight, log_scale, img, txt = _forward(*_problem())
    logits = log_scale.exp() * img @ txt.T
    labels = torch.arange(len(img))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss.item(), weight.grad, log_scale.grad, img.grad, txt.grad


def _rank_contrastive():
    from kclip import dist

    x_img, x_txt, weight0, log_scale0 = _problem()
    rows = slice(dist.rank() * B, (dist.rank() + 1) * B)
    out = {}
    for kind, chunk in VARIANTS:
        weight, log_scale, img, txt = _forward(x_img[rows], x_txt[rows], weight0, log_scale0)
        loss = contrastive_loss(img, txt, log_scale.exp(), local_loss=kind == "local", chunk_size=chunk)
        loss.backward()
        # numpy, not tensors: a tensor sent through the result queue is shared by file descriptor and cannot be
        # received once the rank's process has exited.
        out[(kind, chunk)] = (loss.item(), *(t.grad.numpy() for t in (weight, log_scale, img, txt)))
    return out


def test_full_loss_matches_cross_entropy_reference():
    ref_loss, ref_w, ref_s, _, _ = _reference()
    weight, log_scale, img, txt = _forward(*_problem())
    loss = contrastive_loss(img, txt, log_scale.exp())
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    torch.testing.assert_close(weight.grad, ref_w, atol=1e-5, rtol=0)
    torch.testing.assert_close(log_scale.grad, ref_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_equals_full_single_process(chunk):
    ref_loss, ref_w, ref_s, ref_img, ref_txt = _reference()
    weight, log_scale, img, txt = _forward(*_problem())
    loss = contrastive_loss(img, txt, log_scale.exp(), chunk_size=chunk)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    for got, want in [(weight.grad, ref_w), (log_scale.grad, ref_s), (img.grad, ref_img), (txt.grad, ref_txt)]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tiled_logsumexp_gradcheck():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: _TiledLogSumExp.apply(a, b, s, 2), (a, b, s))
    torch.testing.assert_close(_TiledLogSumExp.apply(a, b, s, 2), torch.logsumexp(s * a @ b.T, dim=1))


def test_two_ranks_equal_single_process_global_batch():
    """Per variant: the mean over ranks of the loss is the 2B-batch loss, and each rank's gradients divided by world
    (what DeepSpeed's averaging does) sum to the single-process gradients of the 2B-batch mean loss."""
    ref_loss, ref_w, ref_s, ref_img, ref_txt = _reference()
    per_rank = run_ranks(_rank_contrastive, world_size=WORLD)
    for variant in VARIANTS:
        losses, *grads = zip(*(r[variant] for r in per_rank))
        w_grads, s_grads, img_grads, txt_grads = ([torch.from_numpy(g) for g in gs] for gs in grads)
        assert sum(losses) / WORLD == pytest.approx(ref_loss, abs=1e-5), variant
        if variant[0] == "full":
            assert losses[0] == pytest.approx(losses[1], abs=1e-6), "full loss differs between ranks"
        torch.testing.assert_close(sum(w_grads) / WORLD, ref_w, atol=1e-5, rtol=0, msg=str(variant))
        torch.testing.assert_close(sum(s_grads) / WORLD, ref_s, atol=1e-5, rtol=0, msg=str(variant))
        torch.testing.assert_close(torch.cat(img_grads) / WORLD, ref_img, atol=1e-5, rtol=0, msg=str(variant))
        torch.testing.assert_close(torch.cat(txt_grads) / WORLD, ref_txt, atol=1e-5, rtol=0, msg=str(variant))


def test_distillation_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0], [2.0, 0.0]])  # orthogonal (cos 0), parallel (cos 1); scale must not matter
    assert distillation_loss(pred, teacher, "cosine").item() == pytest.approx(0.5)
    assert distillation_loss(pred, teacher, "mse").item() == pytest.approx(1.0)  # (|(1,-1)|^2 + 0) / 2
    with pytest.raises(ValueError, match="distill_kind"):
        distillation_loss(pred, teacher, "l1")


def test_concept_loss_hand_computed():
    uniform_logits = torch.zeros(3, 4)
    q = torch.softmax(torch.randn(3, 4), dim=1)
    assert concept_loss(uniform_logits, q).item() == pytest.approx(math.log(4))
    logits = torch.randn(3, 4)
    hard = torch.tensor([2, 0, 1])
    assert concept_loss(logits, F.one_hot(hard, 4).float()).item() == pytest.approx(
        F.cross_entropy(logits, hard).item(), abs=1e-6
    )
    # Soft CE = KL(q || p) + H(q).
    kl = F.kl_div(F.log_softmax(logits, dim=1), q, reduction="batchmean")
    entropy = -(q * q.log()).sum(dim=1).mean()
    assert concept_loss(logits, q).item() == pytest.approx((kl + entropy).item(), abs=1e-6)


def test_concept_kl_logs_on_a_hand_example():
    """Labels q = (1/2, 1/2, 0) and (1, 0, 0): H = (log 2 + 0) / 2. Logits 0 (uniform over 3) give CE = log 3 for
    both rows; the KL logged is CE - H = log 3 - log(2) / 2, per head and as their mean."""
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    confident = torch.tensor([[9.0, 9.0, -9.0], [9.0, -9.0, -9.0]])  # nearly q itself: KL close to 0
    _, terms = KnowledgeCLIPLoss(LossConfig(distill_weight=0.0, contrastive_weight=0.0))(
        concept_logits={"image": torch.zeros(2, 3), "joint": confident}, soft_labels=q)
    assert terms["concept/entropy"].item() == pytest.approx(math.log(2) / 2, abs=1e-7)
    assert terms["concept/kl/image"].item() == pytest.approx(math.log(3) - math.log(2) / 2, abs=1e-6)
    kl_joint = F.kl_div(F.log_softmax(confident, dim=1), q, reduction="batchmean").item()
    assert terms["concept/kl/joint"].item() == pytest.approx(kl_joint, abs=1e-6)
    assert kl_joint < 1e-6
    assert terms["concept/kl"].item() == pytest.approx((terms["concept/kl/image"] + kl_joint).item() / 2, abs=1e-6)


def _combiner_inputs():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
    return dict(
        image_emb=img, text_emb=txt, logit_scale=torch.tensor(10.0),
        distill_pred=torch.randn(4, 16, generator=g, requires_grad=True),
        teacher_target=F.normalize(torch.randn(4, 16, generator=g), dim=1),
        concept_logits={h: torch.randn(4, 5, generator=g, requires_grad=True) for h in ("image", "text", "joint")},
        soft_labels=torch.softmax(torch.randn(4, 5, generator=g), dim=1),
    )


def test_combiner_weighted_sum_and_terms():
    inputs = _combiner_inputs()
    total, terms = KnowledgeCLIPLoss(LossConfig(distill_weight=1.0, concept_weight=0.01, contrastive_weight=2.0))(
        **inputs
    )
    assert set(terms) == {"contrastive", "distill", "distill/mean_baseline", "concept/image", "concept/text",
                          "concept/joint", "concept", "concept/entropy", "concept/kl/image", "concept/kl/text",
                          "concept/kl/joint", "concept/kl"}
    assert all(not v.requires_grad for v in terms.values())
    heads = [concept_loss(inputs["concept_logits"][h], inputs["soft_labels"]) for h in ("image", "text", "joint")]
    assert terms["concept"].item() == pytest.approx(sum(h.item() for h in heads) / 3, abs=1e-6)
    # beta weighs every head (the logged `concept` is their mean, for comparison with log k).
    expected = 2.0 * terms["contrastive"] + terms["distill"] + 0.01 * sum(heads)
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    total.backward()
    assert inputs["distill_pred"].grad is not None and inputs["concept_logits"]["joint"].grad is not None


def test_combiner_zero_weight_skips_term_and_its_inputs():
    inputs = _combiner_inputs()
    inputs.update(distill_pred=None, teacher_target=None)
    total, terms = KnowledgeCLIPLoss(LossConfig(distill_weight=0.0))(**inputs)
    assert "distill" not in terms and "contrastive" in terms and "concept" in terms
    no_concepts = dict(inputs, concept_logits=None, soft_labels=None)  # concept bank not fitted yet
    total, terms = KnowledgeCLIPLoss(LossConfig(distill_weight=0.0))(**no_concepts)
    assert set(terms) == {"contrastive"}
    assert total.item() == pytest.approx(terms["contrastive"].item())
    with pytest.raises(ValueError, match="distill_weight"):
        KnowledgeCLIPLoss(LossConfig())(**no_concepts)
