"""Evaluation metrics against hand-computed cases: retrieval (several captions per image, identical captions, ties,
captions that only truncation makes equal), zero-shot, linear probe, kNN overlap, caption reconstruction, and the AWA2/CUB readers on tiny fake folders."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evalruns import single_thread
from PIL import Image

from kclip.config import load_config
from kclip.data.cli import prepare_main
from kclip.data.loader import build_loader, tokenize
from kclip.eval import attributes
from kclip.eval.caption_em import ProbeConfig, caption_em
from kclip.eval.knn_overlap import distinct_captions, knn_overlap
from kclip.eval.linear_probe import holdout_mask, linear_probe
from kclip.retrieval.metrics import retrieval_metrics
from kclip.retrieval.split import caption_key, embed_split, evaluate_split, image_id
from kclip.eval.zeroshot import class_embeddings, classification_metrics, load_templates
from kclip.export.format import preprocess_spec
from kclip.export.load import (
    LoadedModel,
    TextTokenizer,
    build_encoder,
    encode_texts,
    student_tokenizer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_perfect_embeddings_score_one_and_random_ones_near_chance():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    perfect = retrieval_metrics(x, x)
    assert all(perfect[f"retrieval/{d}_R@1"] == 1.0 and perfect[f"retrieval/{d}_median_rank"] == 1.0
               for d in ("i2t", "t2i"))
    n = 400
    a, b = (F.normalize(torch.randn(n, 64, generator=g), dim=1) for _ in range(2))
    shuffled = retrieval_metrics(a, b)
    for d in ("i2t", "t2i"):
        assert shuffled[f"retrieval/{d}_R@1"] < 5 / n
        assert abs(shuffled[f"retrieval/{d}_R@10"] - 10 / n) < 0.03
        assert abs(shuffled[f"retrieval/{d}_median_rank"] - n / 2) < n / 5


def test_collapsed_model_scores_zero_not_one():
    same = unit(*[[1.0, 0.0]] * 5)
    m = retrieval_metrics(same, same)
    assert m["retrieval/i2t_R@1"] == 0.0 and m["retrieval/t2i_R@1"] == 0.0 and m["retrieval/i2t_median_rank"] == 5


def test_several_captions_per_image_hand_computed():
    # Image A has captions 0, 1; image B has caption 2. Rows: (A, c0), (A, c1), (B, c2).
    image = unit([1, 0], [1, 0], [0, 1])
    # c0 matches A, c1 is closer to B than to A, c2 matches B.
    text = unit([1, 0], [0.2, 1], [0, 1])
    keys = torch.tensor([7, 7, 9])
    m = retrieval_metrics(image, text, image_key=keys, text_key=torch.tensor([0, 1, 2]))
    # i2t over 2 images: A's best caption c0 ranks first; B's best c2 (score 1) beats c1 (0.98): both R@1.
    assert m["retrieval/i2t_R@1"] == 1.0
    # t2i over 3 captions: c0 -> A first; c1 -> B first (wrong, rank 1); c2 -> B first.
    assert m["retrieval/t2i_R@1"] == pytest.approx(2 / 3)
    assert m["retrieval/t2i_R@5"] == 1.0
    # Treating the duplicated image rows as two images would make A's second row a distractor: not so here.
    assert image_id("photos/a.jpg#2") == "photos/a.jpg" == image_id("photos/a.jpg")


def test_identical_caption_texts_are_positives():
    # Two images with the same caption text "a red circle" and one other; the two identical captions embed alike.
    image = unit([1, 0.1], [1, -0.1], [0, 1])
    text = unit([1, 0], [1, 0], [0, 1])
    plain = retrieval_metrics(image, text)
    keyed = retrieval_metrics(image, text, image_key=torch.arange(3), text_key=torch.tensor([5, 5, 6]))
    assert plain["retrieval/i2t_R@1"] < 1.0 and plain["retrieval/t2i_R@1"] < 1.0  # ties/duplicates count against
    assert keyed["retrieval/i2t_R@1"] == 1.0 and keyed["retrieval/t2i_R@1"] == 1.0


def test_classification_metrics_hand_computed():
    scores = torch.tensor([[3.0, 2, 1], [3, 2, 1], [3, 2, 1], [1, 3, 2]])
    targets = torch.tensor([0, 0, 1, 2])
    m = classification_metrics(scores, targets, ks=(1, 2))
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top2"] == pytest.approx(4 / 4)
    assert m["mean_per_class"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)


@pytest.fixture(scope="module")
def encoder():
    cfg = load_config("smoke")
    tok = student_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_encoder(cfg, tok).eval()
    return LoadedModel(model, TextTokenizer(tok, cfg.student.text_max_len), cfg, source="random",
                       preprocess=preprocess_spec(cfg.student.image_size))


def captioned_mds(root, captions: list[str]) -> str:
    """An MDS folder with one pair per caption, each on its own plain-coloured image."""
    root.mkdir(parents=True)
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i, caption in enumerate(captions):
            Image.new("RGB", (32, 32), (200 - 60 * i, 40 + 60 * i, 90)).save(root / f"{i}.png")
            writer.writerow([f"{i}.png", caption])
    out = root / "mds"
    assert prepare_main(["csv", "--src", str(root / "pairs.csv"), "--out", str(out)]) == 0
    return str(out)


def split_loader(data: str, loaded):
    """The loader training evaluates with (kclip.train.validation), not kclip eval's: both callers of embed_split are covered."""
    return build_loader(data, batch_size=8, image_size=loaded.cfg.student.image_size, train=False,
                        student_tokenizer=loaded.tokenizer.hf, student_max_len=loaded.tokenizer.max_len,
                        shuffle=False, num_workers=0)


def test_captions_equal_only_after_truncation_stay_different_texts(tmp_path, encoder):
    prefix = "an emoji of a caption long enough to run past the smoke student's limit: "
    captions = [prefix + "red", prefix + "blue"]
    ids, _, truncated = tokenize(encoder.tokenizer.hf, captions, encoder.tokenizer.max_len)
    assert truncated.all() and torch.equal(ids[0], ids[1])  # the student reads one text twice
    loader = split_loader(captioned_mds(tmp_path / "pairs", captions), encoder)
    emb = embed_split(encoder.model, loader, encoder.device)
    assert emb["caption"] == captions and emb["text_key"][0] != emb["text_key"][1]
    torch.testing.assert_close(emb["text"][0], emb["text"][1])
    m = evaluate_split(encoder.model, loader, encoder.device)
    # Each image's own caption ties with the other image's (same embedding), and ties count against: no credit for
    # the collision. Keyed by token ids, both captions would be positives of both images and every R@1 would be 1.
    assert m["retrieval/i2t_R@1"] == 0.0 and m["retrieval/t2i_R@1"] <= 0.5
    # No case or whitespace folding either: some encoders tell these apart.
    assert len({caption_key(c) for c in ("a red circle", "A red circle", "a red  circle", "a red circle ")}) == 4


def test_identical_raw_captions_are_one_text(tmp_path, encoder):
    loader = split_loader(captioned_mds(tmp_path / "pairs", ["a red circle", "a red circle"]), encoder)
    emb = embed_split(encoder.model, loader, encoder.device)
    assert emb["text_key"][0] == emb["text_key"][1] and emb["image_key"][0] != emb["image_key"][1]
    m = evaluate_split(encoder.model, loader, encoder.device)
    assert m["retrieval/i2t_R@1"] == m["retrieval/t2i_R@1"] == 1.0 and m["num_samples"] == 2


def test_zero_shot_class_embedding_is_normalised_prompt_mean_and_separable_is_perfect(encoder):
    templates = ["a {}", "the {} here"]
    names = ["cat", "dog", "red car"]
    w = class_embeddings(encoder.model, encoder.tokenizer, names, templates)
    by_hand = [F.normalize(encode_texts(encoder.model, encoder.tokenizer, [t.format(n) for t in templates]).mean(0), dim=0)
               for n in names]
    assert torch.allclose(w, torch.stack(by_hand), atol=1e-5)
    # Images placed exactly on their class embedding are classified perfectly.
    targets = torch.tensor([0, 1, 2, 2, 0])
    m = classification_metrics(w[targets] @ w.T, targets)
    assert m["top1"] == m["mean_per_class"] == 1.0


def test_templates_file(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\n{} emoji\n")
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {}.", "{} emoji"]
    (tmp_path / "bad.txt").write_text("no slot\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_templates(tmp_path / "bad.txt")


def test_linear_probe_separable_is_perfect_and_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    classes, d = 4, 16
    centers = torch.randn(classes, d, generator=g) * 4
    y = torch.randint(0, classes, (240,), generator=g)
    x = centers[y] + torch.randn(240, d, generator=g)
    good = linear_probe(x[:160], y[:160], x[160:], y[160:], classes)
    assert good["top1"] == 1.0 and good["mean_per_class"] == 1.0
    noise = torch.randint(0, classes, (240,), generator=g)
    bad = linear_probe(x[:160], noise[:160], x[160:], noise[160:], classes)
    assert bad["top1"] < 0.45
    keys = torch.arange(10_000)
    assert holdout_mask(keys, 0.3).float().mean() == pytest.approx(0.3)


def test_knn_overlap_is_one_under_rotation_and_near_chance_for_unrelated_spaces():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 24, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    assert knn_overlap(a, a @ rotation, k=5) == pytest.approx(1.0)
    unrelated = knn_overlap(a, torch.randn(200, 24, generator=g), k=5)
    assert unrelated < 0.1  # chance is 5 / 199
    assert distinct_captions(["x", "y", "x", "z"], limit=2) == [0, 1]


def test_caption_probe_reads_back_held_out_captions_not_memorised_ones():
    """EM is scored on captions the decoder never saw: embeddings that encode what a caption says (colour and shape
    as separate coordinates) read back unseen colour-shape pairs; embeddings that only tell the captions apart (one
    random vector each) are memorised for the training captions and read back none of the held-out ones."""
    colors, shapes = ["red", "blue", "green", "pink"], ["circle", "square", "star", "moon"]
    pairs = [(c, s) for c in range(4) for s in range(4)]
    held_out = [(c, s) for c, s in pairs if c == s]  # every colour and every shape is still seen in training
    train = [p for p in pairs if p not in held_out]

    def captions(ps):
        return [f"a {colors[c]} {shapes[s]}" for c, s in ps]

    def compositional(ps):
        return torch.stack([torch.cat([torch.eye(4)[c], torch.eye(4)[s]]) for c, s in ps])

    per_caption = torch.randn(len(pairs), 8, generator=torch.Generator().manual_seed(0))

    def memorable(ps):
        return per_caption[[pairs.index(p) for p in ps]]

    cfg = ProbeConfig(steps=150, batch_size=12, hidden=48, layers=1, lr=1e-2, ae_epochs=300, corpus="train")
    reads = caption_em(compositional(train), captions(train), compositional(held_out), captions(held_out), cfg)
    assert reads["train_em"] == 1.0 and reads["em"] >= 0.5 and reads["num_test"] == 4
    memorised = caption_em(memorable(train), captions(train), memorable(held_out), captions(held_out), cfg)
    assert memorised["train_em"] == 1.0 and memorised["em"] == 0.0
    blind = caption_em(torch.zeros(12, 8), captions(train), torch.zeros(4, 8), captions(held_out), cfg)
    # one constant code decodes to one string: a caption at most (the frozen decoder composes unseen ones)
    assert blind["train_em"] <= 1 / 12 and blind["em"] <= 1 / 4
    # Held-out captions that also occur in training are left out, and so are captions over max_bytes
    # ("a blue square" has 13 bytes).
    texts = ["a red circle", "a blue square", "a green star", "a pink moon", "two cats", "one dog"]
    r = caption_em(per_caption[:4], texts[:4], per_caption[2:6], texts[2:], ProbeConfig(steps=2, max_bytes=12))
    assert r["num_train"] == 3 and r["num_test"] == 2


# ---------------------------------------------------------------------------------------------------------------
# AWA2 / CUB layouts


def _jpeg(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), color).save(path)


def fake_awa2(root):
    classes = ["antelope", "grizzly+bear", "killer+whale"]
    predicates = ["black", "white", "flippers", "furry"]
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{i}\t{c}\n" for i, c in enumerate(classes, 1)))
    (root / "predicates.txt").write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(predicates, 1)))
    np.savetxt(root / "predicate-matrix-continuous.txt", np.array([[1, 50, 0, 30], [60, 0, 0, 80], [70, 70, 90, -1]]))
    (root / "testclasses.txt").write_text("grizzly+bear\nkiller+whale\n")
    for i, c in enumerate(classes):
        for j in range(2):
            _jpeg(root / "JPEGImages" / c / f"{c}_{j}.jpg", (40 * i, 100, 30 * j))
    return root


def fake_cub(root):
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    attrs = ["has_bill_shape::curved_(up_or_down)", "has_wing_color::blue", "has_size::small_(5_-_9_in)"]
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    (root.parent / "attributes.txt").write_text("".join(f"{i} {a}\n" for i, a in enumerate(attrs, 1)))
    images = [f"{classes[i % 2]}/img_{i}.jpg" for i in range(6)]
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(images, 1)))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {k % 2 + 1}\n" for k, i in enumerate(range(1, 7))))
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(i <= 2)}\n" for i in range(1, 7)))
    (root / "attributes").mkdir()
    np.savetxt(root / "attributes" / "class_attribute_labels_continuous.txt", np.array([[80, 0, 10], [5, 60, 90]]))
    for i, p in enumerate(images):
        _jpeg(root / "images" / p, (200, 20 * i, 0))
    return root


def test_awa2_and_cub_layouts_are_read_as_published(tmp_path):
    awa = attributes.read_awa2(fake_awa2(tmp_path / "Animals_with_Attributes2"))
    assert awa.class_names == ["antelope", "grizzly bear", "killer whale"]
    assert awa.attribute_prompts[2] == "a photo of an animal with the attribute: flippers."
    assert awa.class_attributes.shape == (3, 4) and len(awa.images) == 6 and awa.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert awa.unseen == [1, 2]
    (tmp_path / "CUB" / "CUB_200_2011").mkdir(parents=True)
    cub = attributes.read_cub(fake_cub(tmp_path / "CUB" / "CUB_200_2011"))
    assert cub.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert cub.attribute_prompts[0] == "a photo of a bird whose bill shape is curved (up or down)."
    # Only the official test images (is_training_image = 0): images 3..6.
    assert [p.name for p in cub.images] == ["img_2.jpg", "img_3.jpg", "img_4.jpg", "img_5.jpg"]
    assert cub.targets.tolist() == [0, 1, 0, 1] and cub.unseen is None


def test_attribute_class_embeddings_formula_and_perfect_case():
    attr = torch.eye(4)  # orthonormal attribute prompt embeddings
    strengths = torch.tensor([[1.0, 0, 0, 1], [0, 2, 0, 0], [0, 0, 3, -5]])
    w = attributes.attribute_class_embeddings(attr, strengths)
    mean = strengths.clamp(min=0) / strengths.clamp(min=0).sum(1, keepdim=True)
    expected = F.normalize(mean - mean.mean(0), dim=1)
    assert torch.allclose(w, expected, atol=1e-6)
    assert classification_metrics(w @ w.T, torch.arange(3))["top1"] == 1.0


def test_attribute_zero_shot_end_to_end_on_fake_folders(tmp_path, encoder):
    awa = attributes.read_awa2(fake_awa2(tmp_path / "awa"))
    m = attributes.attribute_zero_shot(encoder, awa)
    assert set(m) == {f"attributes/awa2/{scope}{kind}/{metric}" for scope in ("", "unseen/")
                      for kind in ("classname", "attribute") for metric in ("top1", "top5", "mean_per_class")
                      } | {"attributes/awa2/num_images"}
    assert m["attributes/awa2/num_images"] == 6


def _top1_and_per_class(scores: torch.Tensor, targets: torch.Tensor, classes: list[int]) -> tuple[float, float]:
    """Top-1 and mean per-class top-1 of images classified among `classes` only (columns of `scores`)."""
    rows = [i for i, t in enumerate(targets.tolist()) if t in classes]
    predicted = {i: classes[int(scores[i, classes].argmax())] for i in rows}
    correct = {i: predicted[i] == targets[i] for i in rows}
    per_class = [np.mean([correct[i] for i in rows if targets[i] == c]) for c in classes]
    return float(np.mean(list(correct.values()))), float(np.mean(per_class))


def test_attribute_zero_shot_scores_unseen_classes_among_themselves(monkeypatch):
    """Designed embeddings: over all classes, image 3 (class 1) is nearest class 0; among the unseen classes 1 and 2
    it is right. Unequal class sizes tell the mean per-class top-1 from the top-1. Right/wrong counts in the comments
    are over all classes, for the class-name scores."""
    classname_w = torch.eye(4)[:3]  # the scores are the images' first three coordinates
    image = torch.tensor([[0.9, 0.1, 0.0, 0.2], [0.3, 0.0, 0.7, 0.1], [0.8, 0.1, 0.1, 0.0],   # class 0: 2 of 3 right
                          [0.8, 0.5, 0.1, 0.0], [0.1, 0.9, 0.2, 0.3],                          # class 1: 1 of 2
                          [0.0, 0.2, 0.9, 0.1], [0.6, 0.5, 0.3, 0.0], [0.1, 0.1, 0.8, 0.4]])   # class 2: 2 of 3
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    attribute_emb = F.normalize(torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), dim=1)
    strengths = torch.tensor([[5.0, 1, 0, 0], [0, 4, 1, 0], [0, 1, 3, 2]])
    data = attributes.AttributeDataset("fake", ["a", "b", "c"], ("{}",), ["p0", "p1", "p2", "p3"], strengths,
                                       [f"{i}.jpg" for i in range(8)], targets, unseen=[1, 2])
    monkeypatch.setattr(attributes, "embed_image_files", lambda loaded, files: image if files == data.images else None)
    monkeypatch.setattr(attributes, "class_embeddings",
                        lambda model, tok, names, templates: classname_w if names == data.class_names else None)
    monkeypatch.setattr(attributes, "encode_texts",
                        lambda model, tok, prompts: attribute_emb if prompts == data.attribute_prompts else None)
    m = attributes.attribute_zero_shot(SimpleNamespace(model=None, tokenizer=None), data)

    # Hand-counted: 5 of 8 right over all classes, per class (2/3 + 1/2 + 2/3) / 3; among the unseen classes
    # images 3, 4, 5, 7 are right and 6 is not (0.5 > 0.3).
    assert m["attributes/fake/classname/top1"] == pytest.approx(5 / 8)
    assert m["attributes/fake/classname/mean_per_class"] == pytest.approx(11 / 18)
    assert m["attributes/fake/unseen/classname/top1"] == pytest.approx(4 / 5)
    assert m["attributes/fake/unseen/classname/mean_per_class"] == pytest.approx((2 / 2 + 2 / 3) / 2)
    # The attribute kind: its class embeddings (formula tested above) through the same protocol.
    attribute_scores = image @ attributes.attribute_class_embeddings(attribute_emb, strengths).T
    for scope, classes in (("", [0, 1, 2]), ("unseen/", [1, 2])):
        for kind, scores in (("classname", image @ classname_w.T), ("attribute", attribute_scores)):
            top1, per_class = _top1_and_per_class(scores, targets, classes)
            assert (m[f"attributes/fake/{scope}{kind}/top1"], m[f"attributes/fake/{scope}{kind}/mean_per_class"]) \
                == pytest.approx((top1, per_class)), (scope, kind)
    assert m["attributes/fake/num_images"] == 8
