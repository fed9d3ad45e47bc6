"""`kclip export`'s open_clip form: the stock open_clip builds the student from `local-dir:OUT` and embeds images and
texts as kclip.load(OUT) does, for a DualEncoder (timm tower with and without architecture kwargs) and a Hugging Face
CLIP student (both of its pooling rules); a student open_clip cannot represent is one line, not a wrong folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_hf_clip_student import EOT, hf_config, tiny_clip

import kclip
from kclip.config import load_config
from kclip.export.format import preprocess_spec
from kclip.export.load import LoadedModel, TextTokenizer, build_encoder
from kclip.export.open_clip import OPEN_CLIP_CONFIG, TIMM_TOWER
from kclip.export.save import export_model
from kclip.export.save import main as export_main
from kclip.tokenizers import student_tokenizer

# A caption longer than any context here: both sides must cut it at student.text_max_len and keep its end-of-text.
TEXTS = ["a dog on the grass", "apple pie", "a red circle " * 30]
ATOL = 1e-5


def rgb_image() -> Image.Image:
    img = Image.new("RGB", (90, 70), "white")
    img.paste((200, 30, 30), (5, 5, 40, 40))
    img.paste((10, 160, 90), (50, 20, 85, 65))
    return img


def perturbed(cfg, tokenizer) -> LoadedModel:
    """The student of `cfg` with every weight moved off its initial value (LayerNorms start at 1 and 0, where a weight
    mapped to the wrong LayerNorm would go unnoticed)."""
    torch.manual_seed(0)
    encoder = build_encoder(cfg, tokenizer).eval()
    with torch.no_grad():
        for p in encoder.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return LoadedModel(encoder, TextTokenizer(tokenizer, cfg.student.text_max_len), cfg, source="test",
                       preprocess=preprocess_spec(cfg.student.image_size))


def compare_with_open_clip(out) -> dict[str, float]:
    """Max |difference| of kclip.load's and open_clip's L2-normalised embeddings; asserts the same pixels and the same
    token ids (open_clip pads to the whole context, kclip to the longest caption)."""
    model, tokenizer, preprocess = kclip.load(out)
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    oc_model.eval()
    pixels = preprocess(rgb_image())[None]
    assert torch.equal(oc_preprocess(rgb_image())[None], pixels)
    enc, oc_ids = tokenizer(TEXTS), oc_tokenizer(TEXTS)
    n = enc["input_ids"].shape[1]
    assert torch.equal(oc_ids[:, :n] * enc["attention_mask"], enc["input_ids"] * enc["attention_mask"])
    with torch.no_grad():
        image, oc_image = model.encode_image(pixels), F.normalize(oc_model.encode_image(pixels), dim=-1)
        text, oc_text = model.encode_text(**enc), F.normalize(oc_model.encode_text(oc_ids), dim=-1)
    assert float(text[0] @ text[1]) < 0.99  # the captions embed apart: the comparison is not of one vector
    return {"image": float((image - oc_image).abs().max()), "text": float((text - oc_text).abs().max())}


@pytest.mark.parametrize("overrides, timm_name", [
    ([], f"local-dir:*/{TIMM_TOWER}"),
    (["student.image_model=test_vit", "student.image_model_kwargs={}", "student.image_size=160"], "test_vit"),
], ids=["demo_vit_with_kwargs", "timm_name_alone"])
def test_dual_encoder_embeds_in_open_clip_as_in_kclip(tmp_path, overrides, timm_name):
    """The demo's student shape (timm ViT patch 8, depth 4, width 128 at 64 px, kwargs open_clip cannot pass to timm;
    text width 128, 3 layers, context 64), byte tokenizer; and a timm model that its name alone builds."""
    cfg = load_config("demo", ["student.tokenizer=byte", "student.token_init=random", *overrides])
    out = export_model(perturbed(cfg, student_tokenizer(cfg)), tmp_path / "export")
    assert {"kclip_model.yaml", "model.safetensors", OPEN_CLIP_CONFIG, "open_clip_model.safetensors",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    vision_cfg = json.loads((out / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["vision_cfg"]
    assert (out / TIMM_TOWER).is_dir() == timm_name.startswith("local-dir:")
    assert vision_cfg["timm_model_name"] == (f"local-dir:{(out / TIMM_TOWER).absolute()}"
                                             if timm_name.startswith("local-dir:") else timm_name)
    diff = compare_with_open_clip(out)
    assert max(diff.values()) < ATOL, diff


@pytest.mark.skipif(not Path(load_config("demo", []).teacher.path).is_file(),
                    reason="the demo teacher (kclip fetch-teacher) is not downloaded")
def test_the_demo_student_with_smollm2s_tokenizer_embeds_in_open_clip_as_in_kclip(tmp_path):
    """The demo config as it is (student.tokenizer=teacher): SmolLM2's tokenizer, which on its own ends a caption with
    its last word and starts it with a BOS that is also its end-of-text token, ends every student caption with that
    token alone (tokenizers.ending_with_eos), so open_clip's `eos` pooling reads the token the student pools."""
    cfg = load_config("demo", ["student.token_init=random"])  # the teacher's token rows would need the teacher loaded
    tokenizer = student_tokenizer(cfg)
    for ids in tokenizer(TEXTS)["input_ids"]:
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
    diff = compare_with_open_clip(export_model(perturbed(cfg, tokenizer), tmp_path / "export"))
    assert max(diff.values()) < ATOL, diff


@pytest.mark.parametrize("eos_token_id", [EOT, 2], ids=["eos_token_id", "legacy_argmax"])
def test_hf_clip_student_embeds_in_open_clip_as_in_kclip(tmp_path, eos_token_id):
    """Hugging Face CLIP -> open_clip's own CLIP; its 40 text positions are cut at the run's text_max_len, 24."""
    cfg = hf_config(tiny_clip(tmp_path / "clip", eos_token_id=eos_token_id, max_position_embeddings=40),
                    "student.text_max_len=24")
    loaded = perturbed(cfg, student_tokenizer(cfg))
    out = export_model(loaded, tmp_path / "export")
    text_cfg = json.loads((out / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["text_cfg"]
    assert (text_cfg["context_length"], text_cfg["pool_type"]) == (24, "eos" if eos_token_id == EOT else "argmax")
    diff = compare_with_open_clip(out)
    assert max(diff.values()) < ATOL, diff
    only = {p.name for p in export_model(loaded, tmp_path / "open_clip", "open_clip").iterdir()}
    assert {OPEN_CLIP_CONFIG, "open_clip_model.safetensors", "tokenizer_config.json"} <= only
    assert not only & {"kclip_model.yaml", "hf", "tokenizer", "preprocess.json"}


def no_eos_tokenizer(folder):
    """A word-level tokenizer that, like SmolLM2's (the demo teacher's), ends a caption with its last word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "dog", "on", "the", "grass", "apple", "pie"]
    vocab = {"[PAD]": 0, "</s>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_a_tokenizer_without_a_final_end_of_text_is_one_line_and_auto_skips_open_clip(tmp_path, capsys, caplog):
    cfg = load_config("smoke", [f"student.tokenizer={no_eos_tokenizer(tmp_path / 'tok')}"])
    source = export_model(perturbed(cfg, student_tokenizer(cfg)), tmp_path / "source", "kclip")
    why = f"open_clip: the student tokenizer ({tmp_path / 'tok'}) does not end every caption with an end-of-text"

    assert export_main([str(source), str(tmp_path / "explicit"), "--format", "open_clip"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kclip export:")]
    assert len(lines) == 1 and lines[0].startswith(f"kclip export: error: {why}"), lines
    assert not (tmp_path / "explicit").exists()

    with caplog.at_level(logging.WARNING, logger="kclip.export.save"):
        assert export_main([str(source), str(tmp_path / "auto")]) == 0
    skipped = [r.getMessage() for r in caplog.records if r.name == "kclip.export.save"]
    assert len(skipped) == 1 and skipped[0].startswith(why), skipped
    files = json.loads(capsys.readouterr().out)["files"]
    assert files == ["kclip_model.yaml", "model.safetensors", "preprocess.json", "tokenizer"]
