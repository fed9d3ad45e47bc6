"""The three Knowledge-CLIP objectives and their weighted sum.

total = alpha * distill + beta * sum_heads(concept_head) + gamma * contrastive   (paper: alpha = gamma = 1, beta = 0.01)

Every loss is computed in float32 whatever the input dtype: with a logit scale up to 100, bf16 logits are only
accurate to about +-0.4, which is as large as the differences the softmax has to resolve.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kclip import dist
from kclip.config import DISTILL_KINDS, LossConfig


class _TiledLogSumExp(torch.autograd.Function):
    """lse_i = log sum_j exp(s * a_i . b_j), computed over [chunk, chunk] tiles of the logits (Inf-CL, 2410.17243).

    Forward keeps only the running row-wise log-sum-exp; backward recomputes each tile and uses
    d lse_i / d logit_ij = softmax_ij = exp(logit_ij - lse_i), so
        grad_a_i = s * sum_j g_i p_ij b_j,   grad_b_j = s * sum_i g_i p_ij a_i,   grad_s = sum_ij g_i p_ij (a_i . b_j).
    Peak extra memory is one [chunk, chunk] tile (plus the [rows] and [cols, E] results) instead of [rows, cols].
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
        lse = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
        for i in range(0, a.shape[0], chunk):
            running = None
            for j in range(0, b.shape[0], chunk):
                tile = torch.logsumexp(scale * (a[i : i + chunk] @ b[j : j + chunk].T), dim=1)
                running = tile if running is None else torch.logaddexp(running, tile)
            lse[i : i + chunk] = running
        ctx.save_for_backward(a, b, scale, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        a, b, scale, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        grad_s = torch.zeros_like(scale)
        for i in range(0, a.shape[0], chunk):
            a_i = a[i : i + chunk]
            for j in range(0, b.shape[0], chunk):
                b_j = b[j : j + chunk]
                raw = a_i @ b_j.T
                weights = torch.exp(scale * raw - lse[i : i + chunk, None]) * grad_lse[i : i + chunk, None]
                grad_a[i : i + chunk] += scale * (weights @ b_j)
                grad_b[j : j + chunk] += scale * (weights.T @ a_i)
                grad_s += (weights * raw).sum()
        return grad_a, grad_b, grad_s, None


def _row_logsumexp(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """logsumexp_j(scale * rows_i . cols_j) for every row i; tiled when chunk_size > 0."""
    if chunk_size > 0:
        return _TiledLogSumExp.apply(rows, cols, scale, chunk_size)
    return torch.logsumexp(scale * (rows @ cols.T), dim=1)


def symmetric_infonce(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of `rows` against `cols`, where row i's positive is its own pair (image_rows[i], text_rows[i]).

    With logits_ij = s * image_rows_i . text_cols_j (and the text->image logits built the same way),
        loss = 1/2 * mean_i [ lse_j(s * img_i . txt_j) + lse_j(s * txt_i . img_j) ] - s * mean_i (img_i . txt_i),
    i.e. (CE(image->text) + CE(text->image)) / 2 with the positive logit split out, which is what lets the
    log-sum-exp run over column tiles. `cols` must contain every row's own pair (the gathered batch).
    Pure function of its inputs (no collectives): the benchmark uses it to simulate one rank of a large world.
    """
    # The full loss's text->image logits are the transpose of its image->text logits: build [N, N] once, not twice.
    square = image_rows is image_cols and text_rows is text_cols and chunk_size == 0
    # Autocast would turn the matmuls back into bf16; the float32 casts below are the point.
    with torch.autocast(image_rows.device.type, enabled=False):
        image_rows, text_rows = image_rows.float(), text_rows.float()
        image_cols, text_cols, scale = image_cols.float(), text_cols.float(), logit_scale.float()
        if square:
            logits = scale * (image_rows @ text_rows.T)
            lse_image, lse_text = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
        else:
            lse_image = _row_logsumexp(image_rows, text_cols, scale, chunk_size)
            lse_text = _row_logsumexp(text_rows, image_cols, scale, chunk_size)
        positive = scale * (image_rows * text_rows).sum(dim=1)
        return (0.5 * (lse_image + lse_text) - positive).mean()


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
    chunk_size: int = 0,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the batch of all ranks.

    image_emb, text_emb: this rank's L2-normalised embeddings [b, E] (equal b on every rank).
    logit_scale: the logit MULTIPLIER s = exp(student.logit_scale) (already exponentiated and clamped by the model,
    as in open_clip), a scalar tensor.

    - full (default): logits = s * I @ T.T over the gathered [N, N], N = world * b; the same value on every rank.
    - local_loss: this rank's b rows against the N gathered columns, positives at rank * b + i (open_clip's
      local_loss); the value differs per rank and its mean over ranks equals the full loss. Memory b x N, not N x N.
    - chunk_size > 0: the same value and gradients, computed over [chunk, chunk] tiles (see `_TiledLogSumExp`).

    Gradients: `dist.all_gather_with_grad` sums every rank's gradient into each rank's own rows, so each rank holds
    world * d(global mean loss)/d(its embeddings); DeepSpeed's average over ranks then yields exactly the gradient
    of the global mean loss, for both variants.
    """
    image_all = dist.all_gather_with_grad(image_emb)
    text_all = dist.all_gather_with_grad(text_emb)
    if local_loss:
        return symmetric_infonce(image_emb, text_emb, image_all, text_all, logit_scale, chunk_size=chunk_size)
    return symmetric_infonce(image_all, text_all, image_all, text_all, logit_scale, chunk_size=chunk_size)


def distillation_loss(projected: torch.Tensor, teacher_emb: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Pull each projected student text embedding towards its own teacher target (rows are independent).

    cosine: mean_i (1 - cos(p_i, t_i)).
    mse:    mean_i || p_i/|p_i| - t_i/|t_i| ||^2, summed over dimensions so the scale does not shrink with the
            teacher's width. On unit vectors this equals 2 * (1 - cos): the same direction of descent as `cosine`,
            twice the gradient.
    Both are satisfied by a constant prediction to the extent that the targets share a direction: use centred
    targets (`TeacherStats`) or a batch-level form below when they do.
    """
    p, t = projected.float(), teacher_emb.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(p, t, dim=-1)).mean()
    if kind == "mse":
        return (F.normalize(p, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(dim=-1).mean()
    raise ValueError(f"loss.distill_kind={kind!r} must be 'cosine' or 'mse'")


def relational_distillation(student_rows: torch.Tensor, student_cols: torch.Tensor, teacher_rows: torch.Tensor,
                            teacher_cols: torch.Tensor, tau: float, offset: int) -> torch.Tensor:
    """KL(teacher || student) between each caption's similarity distributions over the other captions of the batch.

    p^T_ij = softmax_j(cos(t_i, t_j) / tau), p^S_ij = softmax_j(cos(s_i, s_j) / tau) over the gathered columns j,
    leaving out j = i (a caption's similarity to itself is 1 for both and says nothing); loss = mean_i KL(p^T_i || p^S_i)
    (CLIP-KD's affinity mimicking, applied to the text side). Row i of this rank is column `offset + i`.
    Student and teacher may have different widths: only similarities are compared. A constant student gives
    uniform p^S, which scores log(N - 1) - H(p^T): no better than chance.
    """
    with torch.autocast(student_rows.device.type, enabled=False):
        s_rows, s_cols = F.normalize(student_rows.float(), dim=-1), F.normalize(student_cols.float(), dim=-1)
        t_rows, t_cols = F.normalize(teacher_rows.float(), dim=-1), F.normalize(teacher_cols.float(), dim=-1)
        self_mask = torch.zeros(s_rows.shape[0], s_cols.shape[0], dtype=torch.bool, device=s_rows.device)
        self_mask[torch.arange(s_rows.shape[0]), offset + torch.arange(s_rows.shape[0])] = True
        log_p_student = torch.log_softmax((s_rows @ s_cols.T / tau).masked_fill(self_mask, float("-inf")), dim=1)
        log_p_teacher = torch.log_softmax((t_rows @ t_cols.T / tau).masked_fill(self_mask, float("-inf")), dim=1)
        kl = torch.exp(log_p_teacher) * (log_p_teacher - log_p_student)
        return kl.masked_fill(self_mask, 0.0).sum(dim=1).mean()


def contrastive_distillation(pred_rows: torch.Tensor, pred_cols: torch.Tensor, teacher_rows: torch.Tensor,
                             teacher_cols: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between projected student text embeddings and their teacher targets over the gathered batch:
    each prediction must pick its own caption's target among every caption's, and vice versa (CLIP-KD's
    interactive contrastive loss). A constant prediction scores log N: only what differs between captions pays."""
    scale = torch.tensor(1.0 / tau, device=pred_rows.device)
    return symmetric_infonce(F.normalize(pred_rows.float(), dim=-1), F.normalize(teacher_rows.float(), dim=-1),
                             F.normalize(pred_cols.float(), dim=-1), F.normalize(teacher_cols.float(), dim=-1), scale)


def distillation_term(kind: str, student: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """The distillation loss of `kind` for this rank's rows against the batch gathered over all ranks.

    student: this rank's projected text embeddings (cosine, mse, contrastive) or text embeddings (relational);
    target: this rank's teacher targets. Row-wise kinds need no gather. Gradients flow through the gathered student
    rows, so DeepSpeed's average over ranks gives exactly the gradient of the global mean loss (as in
    `contrastive_loss`)."""
    if kind in ("cosine", "mse"):
        return distillation_loss(student, target, kind)
    student_all = dist.all_gather_with_grad(student)
    target_all = dist.all_gather_with_grad(target.detach())
    if kind == "relational":
        return relational_distillation(student, student_all, target, target_all, tau, dist.rank() * student.shape[0])
    if kind == "contrastive":
        return contrastive_distillation(student, student_all, target, target_all, tau)
    raise ValueError(f"loss.distill_kind={kind!r} must be one of {DISTILL_KINDS}")


@torch.no_grad()
def distillation_mean_baseline(kind: str, target: torch.Tensor, tau: float) -> torch.Tensor:
    """What `distillation_term` would score if every prediction were the mean target of the global batch: the bar a
    student must clear to have learnt anything about the individual caption. With raw decoder-LM targets this is
    already ~0.06 for the cosine form (they share one direction); centred, or in a batch-level form, it is chance."""
    mean = dist.all_reduce_sum(target.float().sum(dim=0)) / (target.shape[0] * dist.world_size())
    return distillation_term(kind, mean.expand_as(target).contiguous(), target, tau)


def concept_loss(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy against the concept bank's soft labels q: mean_i sum_k -q_ik log softmax(logits_i)_k.

    KL(q || softmax) = soft CE - H(q): identical gradients (q is a fixed target), but the KL reaches 0 at the optimum
    while the soft CE bottoms out at the labels' entropy H(q).
    """
    return -(soft_labels.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def label_entropy(soft_labels: torch.Tensor) -> torch.Tensor:
    """mean_i H(q_i) in nats: the floor of `concept_loss`, so `concept_loss - label_entropy` is the mean
    KL(q || softmax), the part of the concept loss a head can still remove (0 log 0 = 0)."""
    q = soft_labels.float()
    return -torch.special.xlogy(q, q).sum(dim=-1).mean()


class KnowledgeCLIPLoss:
    """alpha * distillation + beta * sum_heads(concept_head) + gamma * contrastive, from a `LossConfig`.

    beta weighs each concept head: the paper's classifier is the joint head alone, and with heads=[joint] this is its
    loss exactly; extra heads (image, text) add their own terms instead of diluting the joint one to beta / 3.
    A term whose weight is 0 is never computed (its inputs may be None; with contrastive_weight 0 no gather runs).
    Concept terms are also skipped while `soft_labels` is None, i.e. before the concept bank's first fit.
    `teacher_target` is the teacher embedding in the distillation target space (`TeacherStats`, L2-normalised).
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(
        self,
        *,
        image_emb: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        distill_pred: torch.Tensor | None = None,
        teacher_target: torch.Tensor | None = None,
        concept_logits: dict[str, torch.Tensor] | None = None,
        soft_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (total, terms): terms holds detached float32 values under `contrastive`, `distill`,
        `distill/mean_baseline`, `concept/<head>` and `concept` (the mean over heads), `concept/entropy` (the labels'
        mean entropy H(q)) and `concept/kl/<head>`, `concept/kl` (each head's cross-entropy minus H(q), and their
        mean) for the terms that ran."""
        cfg = self.cfg
        weighted, terms = [], {}
        if cfg.contrastive_weight > 0:
            if image_emb is None or text_emb is None or logit_scale is None:
                raise ValueError("loss.contrastive_weight > 0 needs image_emb, text_emb and logit_scale")
            value = contrastive_loss(
                image_emb, text_emb, logit_scale, local_loss=cfg.local_loss, chunk_size=cfg.contrastive_chunk
            )
            weighted.append(cfg.contrastive_weight * value)
            terms["contrastive"] = value
        if cfg.distill_weight > 0:
            student = text_emb if cfg.distill_kind == "relational" else distill_pred
            if student is None or teacher_target is None:
                raise ValueError(f"loss.distill_weight > 0 with distill_kind={cfg.distill_kind} needs "
                                 f"{'text_emb' if cfg.distill_kind == 'relational' else 'distill_pred'} and teacher_target")
            value = distillation_term(cfg.distill_kind, student, teacher_target, cfg.distill_tau)
            weighted.append(cfg.distill_weight * value)
            terms["distill"] = value
            terms["distill/mean_baseline"] = distillation_mean_baseline(cfg.distill_kind, teacher_target, cfg.distill_tau)
        if cfg.concept_weight > 0 and soft_labels is not None:
            if not concept_logits:
                raise ValueError("loss.concept_weight > 0 needs concept_logits once soft labels exist")
            per_head = {head: concept_loss(logits, soft_labels) for head, logits in concept_logits.items()}
            stacked = torch.stack(list(per_head.values()))
            weighted.append(cfg.concept_weight * stacked.sum())
            terms.update({f"concept/{head}": v for head, v in per_head.items()})
            terms["concept"] = stacked.mean()
            # The cross-entropy alone cannot say how far a head is from the labels: its floor H(q) moves at each re-fit.
            entropy = label_entropy(soft_labels)
            terms.update({f"concept/kl/{head}": v - entropy for head, v in per_head.items()})
            terms["concept/kl"] = stacked.mean() - entropy
            terms["concept/entropy"] = entropy
        if not weighted:
            raise ValueError("every loss term is disabled or lacks inputs: nothing to optimise")
        total = torch.stack(weighted).sum()
        return total, {name: v.detach() for name, v in terms.items()}
