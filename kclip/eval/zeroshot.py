"""Zero-shot classification by class-name prompts (CLIP's protocol) and the classification metrics.

Class embedding: w_c = normalize( mean_t normalize(encode_text(template_t.format(name_c))) ).
Prediction: scores = <image, w_c>, ranked over classes.
Metrics: top1, top5 (k capped at the number of classes), mean_per_class = mean over the classes present of the
fraction of their images ranked first correctly (the standard for unbalanced sets and attribute zero-shot).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kclip.eval.protocol import DEFAULT_TEMPLATES
from kclip.export.load import TextTokenizer, encode_texts


def load_templates(path: str | Path) -> list[str]:
    """One template per non-empty line, each with one `{}` for the class name."""
    templates = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not templates:
        raise ValueError(f"{path}: no templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: every template needs exactly one {{}} for the class name, e.g. {bad[0]!r}")
    return templates


def readable(label: str) -> str:
    """Label as a class name in a prompt: `german_shepherd`/`german+shepherd` -> `german shepherd`."""
    return " ".join(label.replace("_", " ").replace("+", " ").split())


def class_embeddings(model, tokenizer: TextTokenizer, names: list[str], templates) -> torch.Tensor:
    """[C, d]: the normalised mean of the normalised prompt embeddings of each class name."""
    prompts = [t.format(name) for name in names for t in templates]
    emb = encode_texts(model, tokenizer, prompts).view(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """scores [n, C], targets [n] -> {top<k>, mean_per_class}."""
    ranked = scores.argsort(dim=1, descending=True)
    hit = ranked == targets[:, None]
    out = {f"top{k}": float(hit[:, : min(k, scores.shape[1])].any(dim=1).float().mean()) for k in ks}
    correct = hit[:, 0].float()
    classes = targets.unique()
    out["mean_per_class"] = float(torch.stack([correct[targets == c].mean() for c in classes]).mean())
    return out


def label_targets(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """(sorted class labels, target index per sample)."""
    classes = sorted(set(labels))
    lookup = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([lookup[v] for v in labels])


def zero_shot(model, tokenizer: TextTokenizer, image_emb: torch.Tensor, labels: list[str],
              templates=DEFAULT_TEMPLATES) -> dict[str, float]:
    """Zero-shot accuracy of L2-normalised image embeddings [n, d] over the classes named by `labels`."""
    classes, targets = label_targets(labels)
    weights = class_embeddings(model, tokenizer, [readable(c) for c in classes], templates)
    return classification_metrics(image_emb @ weights.T, targets)
