"""Zero-shot on attribute-annotated datasets in their published layouts (local folders; nothing is downloaded).

AWA2 (Animals_with_Attributes2/): classes.txt, predicates.txt ("idx<TAB>name" lines), predicate-matrix-continuous.txt
  (or -binary; C x A), JPEGImages/<class>/*.jpg; optional testclasses.txt. Evaluated images: all.
CUB (CUB_200_2011/): classes.txt, images.txt, image_class_labels.txt, train_test_split.txt, attributes.txt (in the
  folder, in attributes/, or beside the folder as the official archive has it),
  attributes/class_attribute_labels_continuous.txt (C x A, percentages). Evaluated images: the official test split
  (is_training_image = 0); optional testclasses.txt (xlsa17 style).

Two ways of building class embeddings from text, each scored over all classes, and also over the unseen classes only
when testclasses.txt lists them (the zero-shot-learning protocol of Xian et al. 2018: images of unseen classes
classified among unseen classes; mean per-class top-1 is the headline number there):
- classname: CLIP prompts with the class name (kclip.eval.zeroshot.class_embeddings, dataset-specific templates);
- attribute: t_a = normalize(text(prompt_a)) for every attribute; with S the class-attribute matrix clipped at 0,
    m_c = sum_a S_ca t_a / sum_a S_ca,   e_c = normalize(m_c - mean_c' m_c').
  Centering removes the direction all classes share (every weight is positive), which otherwise dominates cosines.
Unlike the published protocols, nothing is trained on seen classes: the student is used as it is (CLIP-style).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kclip.eval.zeroshot import class_embeddings, classification_metrics, readable
from kclip.export.load import LoadedModel, embed_image_files, encode_texts

AWA2_TEMPLATES = ("a photo of a {}.", "a photo of the {}, a type of animal.")
AWA2_ATTRIBUTE_PROMPT = "a photo of an animal with the attribute: {}."
CUB_TEMPLATES = ("a photo of a {}, a type of bird.",)
CUB_ATTRIBUTE_PROMPT = "a photo of a bird whose {} is {}."


@dataclass
class AttributeDataset:
    name: str
    class_names: list[str]  # readable names used in prompts
    class_templates: tuple[str, ...]
    attribute_prompts: list[str]
    class_attributes: torch.Tensor  # [C, A] float
    images: list[Path]
    targets: torch.Tensor  # [n] class index per image
    unseen: list[int] | None  # class indices listed in testclasses.txt


def _indexed_lines(path: Path) -> list[str]:
    """Values of `idx<space>value` lines, in file order, checking that the indices run 1..n."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    if [int(r[0]) for r in rows] != list(range(1, len(rows) + 1)):
        raise ValueError(f"{path}: lines must be numbered 1..n in order")
    return [r[1].strip() for r in rows]


def _matrix(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    m = torch.from_numpy(np.loadtxt(path, ndmin=2)).float()
    if tuple(m.shape) != shape:
        raise ValueError(f"{path}: expected a {shape[0]} x {shape[1]} matrix, got {tuple(m.shape)}")
    return m


def _unseen(root: Path, raw_names: list[str]) -> list[int] | None:
    path = root / "testclasses.txt"
    if not path.is_file():
        return None
    lookup = {n: i for i, n in enumerate(raw_names)}
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    missing = [n for n in names if n not in lookup]
    if missing:
        raise ValueError(f"{path}: unknown classes {missing[:3]}")
    return sorted(lookup[n] for n in names)


def read_awa2(root: str | Path) -> AttributeDataset:
    root = Path(root)
    raw = _indexed_lines(root / "classes.txt")
    predicates = _indexed_lines(root / "predicates.txt")
    matrix_file = root / "predicate-matrix-continuous.txt"
    if not matrix_file.is_file():
        matrix_file = root / "predicate-matrix-binary.txt"
    if not matrix_file.is_file():
        raise FileNotFoundError(f"missing {root}/predicate-matrix-continuous.txt (or -binary.txt)")
    images, targets = [], []
    for c, name in enumerate(raw):
        files = sorted((root / "JPEGImages" / name).glob("*.jpg"))
        images += files
        targets += [c] * len(files)
    if not images:
        raise FileNotFoundError(f"no images under {root}/JPEGImages/<class>/*.jpg")
    return AttributeDataset(
        "awa2", [readable(n) for n in raw], AWA2_TEMPLATES,
        [AWA2_ATTRIBUTE_PROMPT.format(readable(p)) for p in predicates],
        _matrix(matrix_file, (len(raw), len(predicates))), images, torch.tensor(targets), _unseen(root, raw),
    )


def cub_attribute_prompt(attribute: str) -> str:
    """`has_bill_shape::curved_(up_or_down)` -> `a photo of a bird whose bill shape is curved (up or down).`"""
    part, _, value = attribute.partition("::")
    return CUB_ATTRIBUTE_PROMPT.format(readable(re.sub(r"^has_", "", part)), readable(value))


def read_cub(root: str | Path) -> AttributeDataset:
    root = Path(root)
    raw = _indexed_lines(root / "classes.txt")
    candidates = [root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt"]
    attributes_file = next((p for p in candidates if p.is_file()), candidates[0])
    attributes = _indexed_lines(attributes_file)
    files = _indexed_lines(root / "images.txt")
    labels = [int(v) - 1 for v in _indexed_lines(root / "image_class_labels.txt")]
    is_train = [v == "1" for v in _indexed_lines(root / "train_test_split.txt")]
    if not len(files) == len(labels) == len(is_train):
        raise ValueError(f"{root}: images.txt, image_class_labels.txt and train_test_split.txt differ in length")
    test = [i for i, t in enumerate(is_train) if not t]
    return AttributeDataset(
        "cub", [readable(re.sub(r"^\d+\.", "", n)) for n in raw], CUB_TEMPLATES,
        [cub_attribute_prompt(a) for a in attributes],
        _matrix(root / "attributes" / "class_attribute_labels_continuous.txt", (len(raw), len(attributes))),
        [root / "images" / files[i] for i in test], torch.tensor([labels[i] for i in test]), _unseen(root, raw),
    )


def attribute_class_embeddings(attribute_emb: torch.Tensor, class_attributes: torch.Tensor) -> torch.Tensor:
    """[C, d] from normalised attribute prompt embeddings [A, d] and class-attribute strengths [C, A] (see top)."""
    weights = class_attributes.clamp(min=0)
    mean = weights @ attribute_emb / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return F.normalize(mean - mean.mean(dim=0, keepdim=True), dim=-1)


def attribute_zero_shot(loaded: LoadedModel, data: AttributeDataset) -> dict[str, float]:
    """`attributes/<name>/[unseen/]{classname,attribute}/{top1,top5,mean_per_class}`."""
    image = embed_image_files(loaded, data.images)
    weights = {
        "classname": class_embeddings(loaded.model, loaded.tokenizer, data.class_names, data.class_templates),
        "attribute": attribute_class_embeddings(
            encode_texts(loaded.model, loaded.tokenizer, data.attribute_prompts), data.class_attributes),
    }
    out = {}
    for kind, w in weights.items():
        for k, v in classification_metrics(image @ w.T, data.targets).items():
            out[f"attributes/{data.name}/{kind}/{k}"] = v
        classes = torch.tensor(data.unseen or [], dtype=torch.long)
        rows = torch.isin(data.targets, classes)
        if rows.any():
            remap = torch.full((len(data.class_names),), -1, dtype=torch.long)
            remap[classes] = torch.arange(len(classes))
            scores = image[rows] @ w[classes].T
            for k, v in classification_metrics(scores, remap[data.targets[rows]]).items():
                out[f"attributes/{data.name}/unseen/{kind}/{k}"] = v
    out[f"attributes/{data.name}/num_images"] = len(data.images)
    return out


READERS = {"awa2": read_awa2, "cub": read_cub}
