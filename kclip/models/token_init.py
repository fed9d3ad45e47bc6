"""Student token embeddings started from the teacher's input embeddings (`student.token_init=teacher`).

A byte-level text tower trained from scratch on a few thousand captions cannot understand a word it never saw, so the
teacher's knowledge of that word has nothing to land on. With the teacher's tokenizer and the teacher's own token
embeddings (reduced to the student's width) as the starting point, every token the teacher knows starts where the
teacher puts it, whether or not the training captions contain it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kclip.config import StudentConfig

# CLIPTextModel draws its token (and position) embeddings from N(0, (0.02 * initializer_factor)^2)
# (CLIPPreTrainedModel._init_weights).
CLIP_EMBEDDING_STD = 0.02


def pca_reduce(weight: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """[V, D] rows -> float32 [V, width]: their coordinates along the top-`width` principal directions (centred over
    the rows), each column scaled to standard deviation `std`.

    The principal directions keep more of the rows' variance than any other `width`-dimensional linear projection.
    Each column gets the std the student's own init gives every dimension: the token embedding is added to a position
    embedding of that scale, and the layers and learning rate are set up for it. Equal per-column std (whitening)
    rather than one common factor, because a decoder's input embeddings are anisotropic: their top directions are
    mostly shared by frequent tokens, and at their natural scale they dominate every row, so after the student's
    LayerNorm ' dog' would look like ' car' and like punctuation. Measured on SmolLM2 (49152 x 576 -> 128): whitened,
    the nearest rows of ' dog' are its casings, plurals and ' cat', and cos(' dog', ' puppy') 0.41 > cos(' dog',
    ' car') 0.28; at a common scale ' post', ' per', ' by' come fifth to eighth and the cosines are 0.11 < 0.75.

    Fewer than `width` directions with any variance (width > D, or fewer independent rows): the extra columns are
    zeros (trainable unless frozen; the position embedding fills them). Chosen over refusing so that a student wider
    than a small teacher still gets the teacher's geometry in its first D dimensions.

    Exact and deterministic: eigendecomposition of the D x D covariance in float64 (for V >> D far cheaper than an SVD
    of the V x D matrix, and no random sketch as in pca_lowrank), each direction's sign fixed so that its
    largest-magnitude entry is positive (eigh leaves signs arbitrary, and LAPACK builds may disagree). Bitwise equal
    for equal BLAS thread counts; other counts sum in another order (SmolLM2: differences below 1e-9).
    """
    if weight.dim() != 2:
        raise ValueError(f"pca_reduce: weight must be [V, D], got shape {tuple(weight.shape)}")
    if width < 1:
        raise ValueError(f"pca_reduce: width must be >= 1, got {width}")
    x = weight.detach().to(torch.float64)
    x = x - x.mean(dim=0)
    variances, vectors = torch.linalg.eigh(x.T @ x)  # ascending
    # Directions with (numerically) no variance carry nothing: whitening them would blow rounding noise up to `std`.
    k = min(width, int((variances > 1e-10 * variances[-1]).sum()))
    if k == 0:
        raise ValueError("pca_reduce: all rows are equal; there is no direction to keep")
    directions = vectors[:, -k:].flip(1)  # [D, k], most variance first
    directions = directions * directions.gather(0, directions.abs().argmax(dim=0, keepdim=True)).sign()
    reduced = x @ directions
    reduced = reduced * (std / reduced.pow(2).mean(dim=0).sqrt())  # centred columns: RMS = std
    return F.pad(reduced, (0, width - k)).float()


def init_token_embeddings(student: torch.nn.Module, cfg: StudentConfig, teacher) -> None:
    """With `cfg.token_init=teacher`: the DualEncoder's token embeddings <- pca_reduce(the teacher's input
    embeddings), frozen with `cfg.freeze_token_embeddings`; nothing with `random`.

    Collective under a sharded teacher (it gathers the embedding matrix): every rank calls it. Call it before
    `deepspeed.initialize`, whose broadcast from rank 0 then leaves no rounding difference between ranks.
    """
    if cfg.token_init == "random":
        return
    embedding = student.text.text_model.embeddings.token_embedding
    weight = teacher.input_embeddings()
    vocab = embedding.num_embeddings
    if weight.shape[0] < vocab:
        raise ValueError(f"student.token_init: the student has {vocab} tokens but the teacher's embedding matrix only "
                         f"{weight.shape[0]} rows")
    # Checkpoints often round their matrix up (e.g. to a multiple of 64) past the tokenizer: no token ever reads the
    # extra rows, and their arbitrary values would shift the mean and the principal directions.
    std = CLIP_EMBEDDING_STD * student.text.config.initializer_factor
    with torch.no_grad():
        embedding.weight.copy_(pca_reduce(weight[:vocab], embedding.embedding_dim, std))
    # build_optimizer takes only parameters that require grad, so a frozen embedding gets no optimizer state.
    embedding.weight.requires_grad_(not cfg.freeze_token_embeddings)
