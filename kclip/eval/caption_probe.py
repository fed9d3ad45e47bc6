"""`kclip eval`'s caption reconstruction probe (kclip.eval.caption_em) on a student: its two sides of distinct
captions (--probe-train against --data, or a fixed split of --data by caption hash), the probe's runs over the stage-1
corpora, and the keys and protocol line they are reported under."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from kclip.eval.caption_em import caption_em
from kclip.eval.knn_overlap import distinct_captions
from kclip.eval.linear_probe import holdout_mask
from kclip.eval.protocol import PROBE_TEST_FRACTION, ProbeConfig
from kclip.retrieval.split import caption_key

if TYPE_CHECKING:
    from kclip.export.load import LoadedModel


def caption_sides(test_emb: dict, train_emb: dict | None):
    """(train text embeddings, train captions, test text embeddings, test captions) of the caption probe: distinct
    captions of --probe-train and --data, or a fixed split of --data's distinct captions by text hash."""
    def distinct(emb):
        rows = distinct_captions(emb["caption"])
        return emb["text"][rows], [emb["caption"][i] for i in rows]

    test_text, test_caps = distinct(test_emb)
    if train_emb is not None:
        train_text, train_caps = distinct(train_emb)
    else:
        held = holdout_mask(torch.tensor([caption_key(c) for c in test_caps]), PROBE_TEST_FRACTION)
        train_text, train_caps = test_text[~held], [c for c, h in zip(test_caps, held) if not h]
        test_text, test_caps = test_text[held], [c for c, h in zip(test_caps, held) if h]
    return train_text, train_caps, test_text, test_caps


def caption_probe(loaded: LoadedModel, sides, cfg: ProbeConfig, teacher_emb=None, em_decoder: str | None = None) -> dict:
    """probe/caption_em... keys (see the module docstring); `teacher_emb`: (train, test) teacher embeddings of the
    sides' captions, for the teacher row; `em_decoder`: a pretrained causal LM replacing stage 1."""
    train_text, train_caps, test_text, test_caps = sides
    others = {"teacher": teacher_emb} if teacher_emb is not None else {}
    lm = None
    if em_decoder:
        from kclip.eval.lm_decoder import load_lm

        lm = load_lm(em_decoder, loaded.device)
    out = {}
    corpora = ("all", "train") if cfg.corpus == "both" else (cfg.corpus,)
    for i, corpus in enumerate(corpora if lm is None else corpora[:1]):
        r = caption_em(train_text, train_caps, test_text, test_caps, dataclasses.replace(cfg, corpus=corpus),
                       device=loaded.device, others=others, upper_bound=lm is None, lm=lm)
        key = "probe/caption_em" + ("_traincorpus" if i else "")
        out.update({key: r["em"], f"{key}_train": r["train_em"]})
        out.update({f"{key}_{name}": r[f"{name}/em"] for name in ("autoencoder", "teacher") if f"{name}/em" in r})
        out.update({"probe/caption_em_num_test": r["num_test"], "probe/caption_em_num_train": r["num_train"]})
    return out


def caption_protocol(cfg: ProbeConfig, probe_train: str | None, em_decoder: str | None) -> str:
    corpus = {"all": "the training and held-out captions (text only)", "train": "the training captions only",
              "both": "the training and held-out captions (text only); *_traincorpus: the training captions only"}
    decoder = (f"frozen pretrained LM {em_decoder}, embedding -> Linear+LayerNorm -> {cfg.prefix_tokens} soft "
               "prefix tokens" if em_decoder else f"stage 1: byte autoencoder trained on {corpus[cfg.corpus]}")
    return f"{cfg.describe()}; {decoder}; stage 2 train: " + (
        probe_train if probe_train else f"{1 - PROBE_TEST_FRACTION:.0%} of distinct captions by text hash")
