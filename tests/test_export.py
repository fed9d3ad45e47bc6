"""`kclip export` / `kclip.load` / `kclip embed`: exported students reload with identical embeddings and
preprocessing; an HF CLIP student's export loads with CLIPModel.from_pretrained."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evalruns import single_thread, tiny_runs
from PIL import Image
from shapes import make_shapes_mds
from test_teacher import real_teacher_path

import kclip
from kclip.config import load_config
from kclip.data.transforms import eval_pixels, normalize
from kclip.export import embed
from kclip.export.format import preprocess_spec
from kclip.export.load import (
    LoadedModel,
    TextTokenizer,
    build_encoder,
    encode_texts,
    load_model,
    student_tokenizer,
)
from kclip.export.save import export_model
from kclip.export.save import main as export_main
from kclip.tokenizers import ending_with_eos, load_tokenizer

TEXTS = ["a red circle", "a blue square", "something else entirely"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with single_thread():
        yield tiny_runs(tmp_path_factory)


def rgba_image() -> Image.Image:
    img = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), (5, 5, 25, 25))
    return img


def test_export_reloads_with_identical_embeddings_and_preprocessing(runs, tmp_path):
    out = tmp_path / "export"
    assert export_main([str(runs["kc"]), str(out), "--format", "kclip"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "kclip_model.yaml", "model.safetensors", "preprocess.json", "tokenizer"]
    source = load_model(runs["kc"])
    model, tokenizer, preprocess = kclip.load(out)
    with torch.no_grad():
        assert torch.equal(model.encode_text(**tokenizer(TEXTS)), source.model.encode_text(**source.tokenizer(TEXTS)))
        pixels = preprocess(rgba_image())[None]
        assert torch.equal(model.encode_image(pixels), source.model.encode_image(pixels))
    # The exported preprocessing is the training pipeline's evaluation transform (transparency onto white).
    white = Image.alpha_composite(Image.new("RGBA", (40, 30), (255,) * 4), rgba_image()).convert("RGB")
    loader_pixels = normalize(torch.from_numpy(np.stack([eval_pixels(white, source.cfg.student.image_size)])))
    assert torch.equal(pixels, loader_pixels)
    assert export_main([str(runs["kc"]), str(out)]) == 2  # refuses to overwrite


def test_hf_clip_student_export_loads_with_from_pretrained(tmp_path):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    torch.manual_seed(0)
    hf_config = CLIPConfig(
        text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 48, "eos_token_id": 1, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(hf_config).save_pretrained(tmp_path / "clip")
    cfg = load_config("smoke", [f"student.hf_clip={tmp_path / 'clip'}"])
    tok = student_tokenizer(cfg)
    encoder = build_encoder(cfg, tok).eval()
    with torch.no_grad():
        encoder.student.logit_scale.fill_(10.0)  # above the training clamp: the export must store the clamp
    loaded = LoadedModel(encoder, TextTokenizer(tok, cfg.student.text_max_len), cfg, source="test",
                         preprocess=preprocess_spec(32))
    out = export_model(loaded, tmp_path / "export")

    hf = CLIPModel.from_pretrained(out / "hf").eval()
    assert hf.logit_scale.dim() == 0 and hf.logit_scale.item() == pytest.approx(math.log(100.0))
    enc = AutoTokenizer.from_pretrained(out / "hf")(TEXTS, padding=True, return_tensors="pt")
    model, tokenizer, preprocess = kclip.load(out)
    pixels = preprocess(rgba_image())[None]
    with torch.no_grad():
        assert torch.allclose(F.normalize(hf.get_text_features(**enc), dim=-1),
                              model.encode_text(**tokenizer(TEXTS)), atol=1e-6)
        assert torch.allclose(F.normalize(hf.get_image_features(pixel_values=pixels), dim=-1),
                              model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(model.encode_text(**tokenizer(TEXTS)), encoder.encode_text(**tokenizer(TEXTS)))


def test_embed_cli_texts_and_images(runs, tmp_path, capsys):
    out = tmp_path / "export"
    export_main([str(runs["plain"]), str(out)])
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    assert embed.main(["--model", str(out), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t.npy")]) == 0
    loaded = load_model(out)
    text = np.load(tmp_path / "t.npy")
    assert text.dtype == np.float32 and np.allclose(text, encode_texts(loaded.model, loaded.tokenizer, TEXTS).numpy())
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rgba_image().save(images / "sub" / "b.png")
    Image.new("RGB", (16, 16), "blue").save(images / "a.jpg")
    assert embed.main(["--model", str(out), "--images", str(images), "--out", str(tmp_path / "i.npy")]) == 0
    assert np.load(tmp_path / "i.npy").shape == (2, text.shape[1])
    assert (tmp_path / "i.paths.txt").read_text().splitlines() == ["a.jpg", "sub/b.png"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 2
    assert embed.main(["--model", str(out), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "x.npy")]) == 2


@pytest.mark.teacher_file
def test_a_run_on_the_teachers_tokenizer_loads_from_elsewhere_after_the_teacher_is_gone(tmp_path, monkeypatch):
    """The demo's student reads the teacher's tokenizer, which its config names by a path relative to where training
    was launched (teachers/...gguf). The run keeps a copy: export, eval and kclip.load read the checkpoint from any
    folder, and after the teacher has moved, with the ids training saw."""
    from kclip.train.loop import train

    launched = tmp_path / "launched"
    (launched / "teachers").mkdir(parents=True)
    os.symlink(Path(real_teacher_path()).absolute(), launched / "teachers" / "teacher.gguf")
    data = make_shapes_mds(tmp_path / "shapes", n=16)
    monkeypatch.chdir(launched)
    cfg = load_config("smoke", ["student.tokenizer=teachers/teacher.gguf", f"data.train={data}", "train.steps=1",
                                "train.global_batch_size=8", "log.tensorboard=false", "dist.timeout_s=60"])
    with single_thread():
        train(cfg, tmp_path / "run")
    trained_ids = student_tokenizer(cfg)(TEXTS)["input_ids"]
    assert all(ids[-1] == student_tokenizer(cfg).eos_token_id for ids in trained_ids)  # ending_with_eos applied

    (launched / "teachers" / "teacher.gguf").unlink()
    monkeypatch.chdir(tmp_path)
    ending_with_eos.cache_clear()  # as in a new process: nothing of the teacher's tokenizer is left in memory
    load_tokenizer.cache_clear()
    assert load_model(Path("run")).tokenizer.hf(TEXTS)["input_ids"] == trained_ids
    assert export_main(["run", "export"]) == 0
    assert kclip.load("export")[1].hf(TEXTS)["input_ids"] == trained_ids


class _Payload:
    """Unpickling it writes a file: the code a run folder from someone else could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_and_never_runs_it(runs, tmp_path, capsys):
    import shutil

    from kclip.export.format import MODEL_STATES
    from kclip.report import report
    from kclip.train import checkpoint

    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(runs["kc"], run)
    states = checkpoint.resolve(run, "latest") / MODEL_STATES
    client = torch.load(states, weights_only=True)
    torch.save({**client, "extra": _Payload(marker)}, states)

    assert export_main([str(run), str(tmp_path / "export")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refused rather than unpickled" in lines[0], lines
    report([run], tmp_path / "report")
    assert "refused rather than unpickled" in (tmp_path / "report" / "report.md").read_text()
    assert not marker.exists()
