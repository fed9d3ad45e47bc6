"""A Hugging Face CLIP student (`student.hf_clip`): it reads the CLIP folder's own tokenizer by default, a tokenizer
whose ids the CLIP text tower cannot pool is refused before any process group, and its checkpoints export and load
after the CLIP folder is gone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evalruns import single_thread
from shapes import make_shapes_mds
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

import kclip
from kclip.config import Config, ConfigError, load_config
from kclip.validate import check_hf_clip
from kclip.validate import validate
from kclip.dist import free_port
from kclip.export.format import EXPORT_HF, EXPORT_TOKENIZER, preprocess_spec
from kclip.export.load import LoadedModel, TextTokenizer, build_encoder, load_model
from kclip.export.save import export_model
from kclip.export.save import main as export_main
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.tokenizers import load_tokenizer, student_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a dog on the grass", "apple pie"]  # same first byte: what a tower pooling position 0 cannot tell apart
# The CLIP BPE vocabulary over single bytes (no merges): each byte alone and word-final, then CLIP's two specials,
# end-of-text last, as in CLIP's own vocabulary.
BYTES = list(bytes_to_unicode().values())
VOCAB = BYTES + [b + "</w>" for b in BYTES] + ["<|startoftext|>", "<|endoftext|>"]
EOT = len(VOCAB) - 1


def tiny_clip(folder: Path, *, tokenizer: bool = True, weights: bool = True, vision: dict | None = None,
              **text) -> Path:
    """A random CLIPModel (32-wide towers, 32x32 images, 32 text positions) saved at `folder`, with a CLIP tokenizer
    and weights unless told otherwise. `text` overrides the text config (vocab_size, eos_token_id, ...), `vision`
    the vision config (image_size, patch_size, ...)."""
    torch.manual_seed(0)
    text = {"vocab_size": len(VOCAB), "eos_token_id": EOT, "bos_token_id": EOT - 1, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
            **text}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, **(vision or {})}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    if tokenizer:
        (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return folder


def hf_config(clip: Path, *overrides: str) -> Config:
    """The smoke config (byte tokenizer named explicitly) turned into a plain-CLIP run of the CLIP student at `clip`,
    its tokenizer back at the default."""
    return load_config("smoke", [f"student.hf_clip={clip}", "student.tokenizer=auto", "student.text_max_len=32",
                                 "loss.distill_weight=0", "loss.concept_weight=0", *overrides])


def cosine(model: KnowledgeCLIP, tokenizer) -> float:
    with torch.no_grad():
        emb = model.encode_text(**TextTokenizer(tokenizer, 32)(TEXTS))
    return float(emb[0] @ emb[1])


@pytest.mark.parametrize("eos_token_id", [EOT, 2], ids=["eos_token_id", "legacy_argmax"])
def test_default_tokenizer_is_the_clip_folders_so_captions_embed_apart(tmp_path, eos_token_id):
    """Both pooling rules of HF CLIP (the first eos_token_id; the largest id, in configs with eos_token_id 2) find
    the end of every caption the folder's own tokenizer writes."""
    cfg = hf_config(tiny_clip(tmp_path / "clip", eos_token_id=eos_token_id))
    check_hf_clip(cfg)
    tokenizer = student_tokenizer(cfg)
    assert tokenizer.eos_token_id == EOT
    model = KnowledgeCLIP(cfg, tokenizer, None).eval()
    assert cosine(model, tokenizer) < 0.99
    # The byte tokenizer (the default before `auto`) writes no id the tower looks for, so the tower pools another
    # position than the caption's end; validation refuses it.
    byte = load_tokenizer("byte")
    if eos_token_id == EOT:  # pooled at position 0: both captions' first byte, "a"
        assert cosine(model, byte) == pytest.approx(1.0, abs=1e-6)
    pooled = f"eos_token_id {EOT}" if eos_token_id == EOT else "the caption's largest id"
    with pytest.raises(ConfigError, match=f"^student.tokenizer: byte ends a caption with id 1, but student.hf_clip "
                                          f"pools the text at {pooled}"):
        validate(hf_config(tmp_path / "clip", "student.tokenizer=byte"), 1)


@pytest.mark.parametrize("clip, overrides, message", [
    ({"vocab_size": 300, "eos_token_id": 299}, [], "student.tokenizer: .* has 514 token ids but .* embeds only 300"),
    ({"eos_token_id": EOT - 1}, [], f"student.tokenizer: .* at eos_token_id {EOT - 1}"),
    ({"tokenizer": False}, [], "student.tokenizer: 'auto' reads .*, which holds no tokenizer"),
    ({}, ["student.tokenizer=/no/such/tokenizer"], "student.tokenizer: cannot load /no/such/tokenizer"),
    ({}, ["student.text_max_len=48"], "student.text_max_len: 48 exceeds student.hf_clip's 32 text positions"),
    ({"weights": False}, [], "student.hf_clip: .* holds no weights"),
], ids=["vocab_too_large", "eos_elsewhere", "folder_without_tokenizer", "missing_tokenizer", "too_long", "no_weights"])
def test_a_clip_folder_or_tokenizer_that_cannot_work_is_one_config_error(tmp_path, clip, overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        validate(hf_config(tiny_clip(tmp_path / "clip", **clip), *overrides), 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config, message", [
    (None, "has no config.json"), ('{"model_type": "llama"}', "holds a 'llama' model, not a CLIPModel"),
    ('{"model_type": "cl', r"is unreadable \(JSONDecodeError: "), ("[]", "is not a model config"),
], ids=["no_config", "not_clip", "truncated", "not_an_object"])
def test_a_folder_that_is_no_clip_model_is_one_config_error(tmp_path, config, message):
    (tmp_path / "clip").mkdir()
    if config is not None:
        (tmp_path / "clip" / "config.json").write_text(config)
    with pytest.raises(ConfigError, match=rf"^student.hf_clip: \S+ {message}") as err:
        validate(hf_config(tmp_path / "clip"), 1)
    assert "\n" not in str(err.value)


def test_the_byte_tokenizer_with_a_clip_student_fails_before_any_process_group(tmp_path):
    clip = tiny_clip(tmp_path / "clip")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # With WORLD_SIZE=2 and no second rank, starting a process group would block: exit 2 proves validation came first.
    env.update(DS_ACCELERATOR="cpu", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "kclip.cli", "train", "--config", "smoke", "--output",
                           str(tmp_path / "run"), f"student.hf_clip={clip}", "student.text_max_len=32"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert len(lines) == 1 and lines[0].startswith("kclip: error: student.tokenizer: byte ends a caption"), proc.stderr


def test_export_tokenizers_truncate_at_the_runs_text_max_len(tmp_path):
    cfg = hf_config(tiny_clip(tmp_path / "clip", max_position_embeddings=77), "student.text_max_len=24")
    tokenizer = student_tokenizer(cfg)
    assert tokenizer.model_max_length != 24
    loaded = LoadedModel(build_encoder(cfg, tokenizer).eval(), TextTokenizer(tokenizer, 24), cfg, source="test",
                         preprocess=preprocess_spec(32))
    out = export_model(loaded, tmp_path / "export")
    for folder in (EXPORT_HF, EXPORT_TOKENIZER):
        saved = AutoTokenizer.from_pretrained(out / folder)
        assert saved.model_max_length == 24
        assert len(saved(" ".join(["word"] * 100), truncation=True)["input_ids"]) == 24
    assert tokenizer.model_max_length != 24  # the run's (shared) tokenizer is left as it was


def embeddings(model, tokenizer, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_text(**tokenizer(TEXTS)), model.encode_image(pixels)


def test_a_checkpoint_exports_and_loads_after_the_clip_folder_is_gone(tmp_path):
    from kclip.train.loop import train

    clip = tiny_clip(tmp_path / "clip")
    data = make_shapes_mds(tmp_path / "shapes", n=24)
    cfg = hf_config(clip, f"data.train={data}", "train.steps=2", "train.global_batch_size=8", "log.tensorboard=false",
                    "data.num_workers=0", "dist.timeout_s=60")
    validate(cfg, 1)
    with single_thread():
        train(cfg, tmp_path / "run")
    pixels = torch.rand(2, 3, 32, 32)
    trained = load_model(tmp_path / "run")
    # The run's copy builds the same model as the CLIP folder did (given the trained weights).
    original = build_encoder(trained.cfg, student_tokenizer(trained.cfg)).eval()
    original.student.load_state_dict(trained.model.student.state_dict())
    expected = embeddings(original, TextTokenizer(student_tokenizer(cfg), 32), pixels)
    shutil.rmtree(clip)

    assert export_main([str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    exported = kclip.load(tmp_path / "export")
    reloaded = load_model(tmp_path / "run")
    for model, tokenizer in ((exported[0], exported[1]), (reloaded.model, reloaded.tokenizer)):
        for got, want in zip(embeddings(model, tokenizer, pixels), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert cosine(exported[0], exported[1].hf) < 0.99
