"""The caption EM probe as the paper runs it: stage 1 (a byte caption autoencoder, trained once per corpus and
cached), stage 2 (only Linear + LayerNorm into the frozen decoder, trained on training captions only), the upper
bound (the autoencoder's own encoder) against a random embedding, `kclip eval`'s keys, and a pretrained LM decoder
(SmolLM2) on a few captions."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from evalruns import single_thread, tiny_runs

from kclip.eval import caption_autoencoder as ca
from kclip.eval import caption_em as em
from kclip.eval.protocol import ProbeConfig

COLORS = ["red", "blue", "green", "pink", "gold"]
SHAPES = ["circle", "square", "star", "moon", "heart"]
SIZES = ["big", "small"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KCLIP_CACHE", str(tmp_path / "cache"))
    with single_thread():
        yield


def synthetic() -> tuple[list[str], list[str]]:
    """50 captions; 10 held out, so that every word is still seen in training."""
    caps = [f"a {z} {c} {s}" for z in SIZES for c in COLORS for s in SHAPES]
    held = [c for i, c in enumerate(caps) if i % 5 == (i // 5) % 5]
    return [c for c in caps if c not in held], held


SMALL = ProbeConfig(hidden=64, layers=1, batch_size=32, ae_epochs=400, ae_max_steps=600, ae_lr=3e-3, steps=60,
                    lr=3e-3, max_bytes=40)


def test_autoencoder_is_cached_per_corpus_and_settings(tmp_path):
    cfg = ProbeConfig(hidden=16, batch_size=4, ae_max_steps=3, max_bytes=40)
    corpus = ["a red star", "two blue moons", "one dog"]
    before = ca.TRAININGS["count"]
    first, path = ca.load_or_train(corpus, cfg)
    assert ca.TRAININGS["count"] == before + 1 and Path(path).is_file()
    assert Path(path).parent == tmp_path / "cache" / "caption_ae"
    assert not [p for p in Path(path).parent.iterdir() if p.suffix == ".partial"]
    # Order and duplicates do not change the corpus; the second call reads the file back and trains nothing.
    again, path2 = ca.load_or_train(list(reversed(corpus)) + corpus[:1], cfg)
    assert ca.TRAININGS["count"] == before + 1 and path2 == path
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    # Another corpus, or other stage-1 settings, is another entry; stage-2 settings are not part of the key.
    assert ca.cache_path(corpus + ["a cat"], cfg) != Path(path)
    assert ca.cache_path(corpus, ProbeConfig(hidden=16, batch_size=4, ae_max_steps=4, max_bytes=40)) != Path(path)
    assert ca.cache_path(corpus, ProbeConfig(hidden=16, batch_size=4, ae_max_steps=3, max_bytes=40, steps=7,
                                             corpus="train")) == Path(path)
    # A damaged entry is retrained, not fatal.
    Path(path).write_bytes(b"truncated")
    ca.load_or_train(corpus, cfg)
    assert ca.TRAININGS["count"] == before + 2


def test_stage2_trains_only_linear_and_layernorm():
    cfg = ProbeConfig(hidden=16, batch_size=4, ae_max_steps=5, steps=5, lr=1e-1, max_bytes=40)
    captions = ["a red star", "two blue moons", "one dog", "a cat"]
    autoencoder, _ = ca.load_or_train(captions, cfg)
    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    emb = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    head = em.stage2(autoencoder.decoder, emb, captions, cfg)  # random initialisation: the loss moves the weights
    assert all(torch.equal(before[k], v) for k, v in autoencoder.state_dict().items())
    trained = {n for n, _ in head.named_parameters()}
    assert trained == {"1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias"}
    assert isinstance(head[1][0], torch.nn.Linear) and isinstance(head[1][1], torch.nn.LayerNorm)
    fresh = em.adapter(8, cfg)
    assert not torch.equal(head[1][1].weight, fresh[1].weight)  # LayerNorm gain left its initial 1


def test_held_out_captions_never_reach_stage2(monkeypatch):
    seen = []
    real = em.stage2

    def spy(decoder, emb, captions, cfg, codes=None, desc=""):
        seen.append(list(captions))
        assert len(emb) == len(captions) and (codes is None or len(codes) == len(captions))
        return real(decoder, emb, captions, cfg, codes, desc)

    monkeypatch.setattr(em, "stage2", spy)
    train = ["a red star", "two blue moons", "one dog", "a cat", "an owl"]
    test = ["a cat", "a green frog", "three pink hearts in a row", "a yellow sun"]  # "a cat" is also a training one
    cfg = ProbeConfig(hidden=16, batch_size=4, ae_max_steps=3, steps=2, max_bytes=20)
    g = torch.Generator().manual_seed(0)
    r = em.caption_em(torch.randn(5, 8, generator=g), train, torch.randn(4, 8, generator=g), test, cfg,
                      others={"teacher": (torch.randn(5, 6, generator=g), torch.randn(4, 6, generator=g))},
                      upper_bound=True)
    assert r["num_train"] == 5 and r["num_test"] == 2  # "a cat": in training; the 26-byte one: over max_bytes
    assert len(seen) == 3 and all(s == train for s in seen)
    assert {"em", "train_em", "teacher/em", "autoencoder/em"} <= set(r)


def test_upper_bound_reads_back_held_out_captions_a_random_embedding_does_not():
    """The autoencoder's own encoder, through a fresh Linear + LayerNorm, reproduces held-out captions (the decoder
    saw their text in stage 1, as T5 saw English); one random vector per caption tells the training captions apart
    but carries nothing about a held-out one. With a decoder that saw only the training captions, the upper bound
    still reads back unseen combinations of seen words."""
    train, held = synthetic()
    g = torch.Generator().manual_seed(1)
    rand_train, rand_held = torch.randn(len(train), 32, generator=g), torch.randn(len(held), 32, generator=g)
    r = em.caption_em(rand_train, train, rand_held, held, SMALL, upper_bound=True)
    assert r["num_test"] == 10 and r["autoencoder/em"] >= 0.8, r
    assert r["em"] <= 0.1 and r["train_em"] >= 0.5, r
    t = em.caption_em(rand_train, train, rand_held, held, ProbeConfig(**{**vars(SMALL), "corpus": "train"}),
                      upper_bound=True)
    assert t["autoencoder_file"] != r["autoencoder_file"] and t["autoencoder/em"] >= 0.5 and t["em"] == 0.0, t


def test_greedy_lm_decoding_stops_at_eos():
    """Scripted logits: row 0 says 5, 6, EOS, 7; row 1 never ends (None: longer than any caption of its limit)."""
    from kclip.eval.lm_decoder import greedy

    eos, script = 2, [[5, 3], [6, 3], [2, 3], [7, 3], [7, 3]]

    class Fake:
        calls = 0

        def get_input_embeddings(self):
            return lambda ids: torch.zeros(len(ids), 1, 4)

        def __call__(self, inputs_embeds, past_key_values=None, use_cache=True):
            step = self.calls
            self.calls += 1
            logits = torch.zeros(2, inputs_embeds.shape[1], 10)
            for row, token in enumerate(script[step]):
                logits[row, -1, token] = 1.0
            return SimpleNamespace(logits=logits, past_key_values=None)

    fake = Fake()
    out = greedy(fake, SimpleNamespace(eos_token_id=eos), torch.zeros(2, 3, 4), [3, 3])
    assert out == [[5, 6], [3, 3, 3, 3, None]] and fake.calls == 4  # 1 + the limit: a longer row cannot match


def test_eval_cli_writes_caption_em_rows(tmp_path_factory, tmp_path):
    from kclip.eval.run import main

    runs = tiny_runs(tmp_path_factory)
    out = tmp_path / "m.json"
    assert main(["--checkpoint", str(runs["kc"]), "--data", str(runs["data"]), "--out", str(out), "--batch-size",
                 "8", "--skip", "retrieval,zeroshot,linear,knn", "--em-steps", "3", "--em-ae-steps", "5",
                 "--em-decoder-corpus", "both"]) == 0
    m = json.loads(out.read_text())
    keys = [f"probe/caption_em{c}{r}" for c in ("", "_traincorpus") for r in ("", "_train", "_autoencoder",
                                                                                "_teacher")]
    assert all(0.0 <= m[k] <= 1.0 for k in keys), m
    assert m["probe/caption_em_num_test"] >= 1 and m["probe/caption_em_num_train"] >= 1
    assert "training and held-out captions" in m["protocol/caption_em"]
    assert len(list((tmp_path / "cache" / "caption_ae").glob("*.pt"))) == 2  # all captions; training ones only


def real_teacher_path() -> str:
    path = os.environ.get("KCLIP_TEACHER") or str(Path(__file__).parent.parent / "teachers" /
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"real small teacher not found at {path}: run `kclip fetch-teacher` or set KCLIP_TEACHER")
    return path


@pytest.mark.slow
@pytest.mark.teacher_file
def test_pretrained_lm_decoder_on_a_few_captions(monkeypatch):
    """SmolLM2 as the frozen decoder, a few captions and steps (a full run is a GPU job): the prefix trains (loss
    falls, the LM's weights stay), every held-out caption is decoded and scored, decoding ends at EOS."""
    from kclip.eval.lm_decoder import lm_caption_em, load_lm

    monkeypatch.delenv("KCLIP_CACHE")  # the converted teacher of the user's cache, if any
    model, tokenizer = load_lm(real_teacher_path())
    before = [p.clone() for p in model.parameters()][:3]
    train = ["a red star", "a blue moon", "a green frog", "a pink heart"]
    held = ["a red moon", "a blue star"]
    g = torch.Generator().manual_seed(0)
    cfg = ProbeConfig(steps=16, batch_size=4, lr=1e-2, prefix_tokens=2)
    r = lm_caption_em(model, tokenizer, torch.randn(4, 16, generator=g), train, torch.randn(2, 16, generator=g), held,
                      cfg)
    losses = r["losses"]
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0, losses  # from the uniform 10.8 nats down (8.5 after 11 steps)
    assert all(torch.equal(a, b) for a, b in zip(before, list(model.parameters())[:3]))
    assert len(r["decoded"]) == 2 and r["em"] in (0.0, 0.5, 1.0) and 0.0 <= r["train_em"] <= 1.0
    # a decoding is text up to its first EOS, or None when it ran past the caption's length without one
    assert all(d is None or tokenizer.eos_token not in d for d in r["decoded"])
