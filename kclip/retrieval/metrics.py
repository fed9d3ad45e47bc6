"""Image<->text retrieval with several captions per image and repeated caption texts.

Rows are (image, caption) pairs. Rows with the same image key show the same image: the image gallery holds each image
once. A caption is a positive for an image when it belongs to that image OR its text is identical to one of that
image's captions (identical texts cannot be told apart by any text encoder, so ranking one above the other is luck).

Rank of a query = number of NEGATIVE candidates scoring >= its best-scoring positive (0 = a positive is first). Ties
count against the query, so a collapsed model (all scores equal) gets R@1 = 0, not 1.
    R@k = mean(rank < k),   median_rank = median(rank + 1).
"""
from __future__ import annotations

import torch

# Queries scored per block: bounds memory at block x gallery scores (and masks) for large evaluation sets.
QUERY_BLOCK = 256


def group_ids(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse, first): dense id per row (rows with equal keys share one) and the first row of each id."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return inverse, first


def first_positive_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """scores, positive [q, n] -> rank [q]: negatives scoring >= the best positive (every row needs a positive)."""
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positive).sum(dim=1)


def retrieval_ranks(image: torch.Tensor, text: torch.Tensor, image_key: torch.Tensor,
                    text_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t ranks over unique images, t2i ranks over all captions).

    image, text [n, d] L2-normalised rows of n pairs; image_key [n] (equal = same image), text_key [n] (equal = same
    caption text). Incidence I[c, g] = 1 when caption text c occurs on image g; caption t is positive for image g
    iff I[text_class(t), g].
    """
    gid, first = group_ids(image_key)
    cid, _ = group_ids(text_key)
    gallery = image[first]
    # Sparse (n entries): a dense texts x images table would not fit for large sets with few repeats.
    ones = torch.ones(len(gid))
    incidence = torch.sparse_coo_tensor(torch.stack([cid, gid]), ones, (int(cid.max()) + 1, len(first)),
                                        check_invariants=True).coalesce()
    by_image = incidence.t().coalesce()

    def rows(matrix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return matrix.index_select(0, ids).to_dense() > 0

    i2t = [first_positive_ranks(gallery[g] @ text.T, rows(by_image, g)[:, cid])
           for g in torch.arange(len(first)).split(QUERY_BLOCK)]
    t2i = [first_positive_ranks(text[t] @ gallery.T, rows(incidence, cid[t]))
           for t in torch.arange(len(text)).split(QUERY_BLOCK)]
    return torch.cat(i2t), torch.cat(t2i)


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, image_key: torch.Tensor | None = None,
                      text_key: torch.Tensor | None = None, ks=(1, 5, 10)) -> dict[str, float]:
    """`retrieval/{i2t,t2i}_R@k` and `retrieval/{i2t,t2i}_median_rank` (1-based). Without keys, row i of `image`
    and row i of `text` form the only positive pair (all images and captions distinct)."""
    n = image.shape[0]
    image_key = torch.arange(n) if image_key is None else image_key.cpu()
    text_key = torch.arange(n) if text_key is None else text_key.cpu()
    out = {}
    for name, ranks in zip(("i2t", "t2i"), retrieval_ranks(image.float().cpu(), text.float().cpu(), image_key, text_key)):
        for k in ks:
            out[f"retrieval/{name}_R@{k}"] = float((ranks < k).float().mean())
        out[f"retrieval/{name}_median_rank"] = float(ranks.float().median() + 1)
    return out
