"""Linear probe on frozen features: multinomial logistic regression by L-BFGS, L2 strength chosen on held-out data.

Features are standardised with the training mean and std. For a strength lam the fitted model minimises
    mean_i CE(softmax(W x_i + b), y_i) + lam / 2 * ||W||_F^2        (the bias is not penalised).
Protocol: a fixed random 20% of the training features is held out; every lam in LAMBDAS is fitted on the other 80%
and scored by top-1 on the held-out part; the best lam (ties: the stronger penalty) is refitted on all training
features, and the test features are scored with it.
"""
from __future__ import annotations

import torch

from kclip.console import progress
from kclip.eval.zeroshot import classification_metrics

LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
VALIDATION_FRACTION = 0.2
MAX_ITER = 200


def holdout_mask(keys: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the rows whose key falls in the held-out `fraction`; depends on the key only, not on row order, so the
    same image lands on the same side of the split in every run and every model compared."""
    return (keys % 10_000) < round(fraction * 10_000)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
                 max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, d], b [C]) minimising the penalised cross-entropy above (float64: L-BFGS converges cleanly)."""
    x = x.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def top1(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x.double() @ w.T + b).argmax(dim=1) == y).double().mean())


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, seed: int = 0) -> dict:
    """{top1, top5, mean_per_class, lambda} on the test features; y are class indices in [0, num_classes)."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(VALIDATION_FRACTION * len(train_x)))
    val, fit = order[:n_val], order[n_val:]
    with progress(len(LAMBDAS) + 1, "linear probe", "fit", leave=False) as bar:
        scores = []
        for lam in LAMBDAS:
            scores.append(top1(*fit_logistic(train_x[fit], train_y[fit], num_classes, lam), train_x[val], train_y[val]))
            bar.update()
        best = max(range(len(LAMBDAS)), key=lambda i: (scores[i], i))
        w, b = fit_logistic(train_x, train_y, num_classes, LAMBDAS[best])
        bar.update()
    return {**classification_metrics((test_x.double() @ w.T + b).float(), test_y), "lambda": LAMBDAS[best]}
