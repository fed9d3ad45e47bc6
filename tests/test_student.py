"""The student and its heads: shapes, the clamp on the temperature, and loading a Hugging Face CLIPModel."""
import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from kclip.config import Config
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.tokenizers import load_tokenizer

TINY_IMAGE = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2)


def tiny_config(**loss) -> Config:
    cfg = Config()
    cfg.student.image_model = "vit_tiny_patch16_224"
    cfg.student.image_model_kwargs = dict(TINY_IMAGE)
    cfg.student.image_size = 32
    cfg.student.text_width, cfg.student.text_layers, cfg.student.text_heads = 32, 2, 2
    cfg.student.text_max_len, cfg.student.embed_dim = 32, 16
    cfg.concepts.k = 5
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return cfg


def batch(tok, n=3):
    enc = tok(["a red dog", "two cats on a mat", "x"][:n], padding=True, return_tensors="pt")
    return torch.randn(n, 3, 32, 32), enc["input_ids"], enc["attention_mask"]


def test_forward_shapes_and_normalised_embeddings():
    tok = load_tokenizer("byte")
    model = KnowledgeCLIP(tiny_config(), tok, teacher_dim=24)
    out = model(*batch(tok))
    assert out["image_emb"].shape == out["text_emb"].shape == (3, 16)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(3))
    assert out["distill_pred"].shape == (3, 24)
    assert {k: v.shape for k, v in out["concept_logits"].items()} == {k: (3, 5) for k in ("image", "text", "joint")}


def test_text_embedding_ignores_padding():
    tok = load_tokenizer("byte")
    model = KnowledgeCLIP(tiny_config(), tok, teacher_dim=8).eval()
    alone = tok(["a red dog"], return_tensors="pt")
    padded = tok(["a red dog", "a much longer caption here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model.encode_text(alone["input_ids"], alone["attention_mask"])
        b = model.encode_text(padded["input_ids"], padded["attention_mask"])[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_zero_weights_build_no_heads():
    tok = load_tokenizer("byte")
    model = KnowledgeCLIP(tiny_config(distill_weight=0.0, concept_weight=0.0), tok, teacher_dim=None)
    assert model.projector is None and model.concept_heads is None
    assert set(model(*batch(tok))) == {"image_emb", "text_emb", "logit_scale"}


def test_hf_clip_checkpoint_as_student(tmp_path):
    hf = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    ))
    hf.save_pretrained(tmp_path)
    cfg = tiny_config()
    cfg.student.hf_clip = str(tmp_path)
    tok = load_tokenizer("byte")
    model = KnowledgeCLIP(cfg, tok, teacher_dim=8).eval()
    pixels, ids, mask = batch(tok, 2)
    with torch.no_grad():
        out = model(pixels, ids, mask)
        expected = torch.nn.functional.normalize(hf.eval().get_image_features(pixel_values=pixels), dim=-1)
    torch.testing.assert_close(out["image_emb"], expected)
    assert out["text_emb"].shape == (2, 16)


def test_bf16_model_accepts_float32_pixels_from_the_loader():
    """A bf16 DeepSpeed engine holds bf16 weights while the loader yields float32 pixels (the GPU path, run here on
    the CPU)."""
    tok = load_tokenizer("byte")
    model = KnowledgeCLIP(tiny_config(), tok, teacher_dim=8).to(torch.bfloat16)
    out = model(*batch(tok))
    assert out["image_emb"].dtype == torch.bfloat16 and torch.isfinite(out["image_emb"].float()).all()


def _clamp_reaches_the_optimizer():
    """One rank, a ZeRO-1 engine: push the temperature above the cap, clamp, and check the optimizer's fp32 master
    copy was clamped too (else the next step would start from the unclamped value); then the loss lowers it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from kclip.models.student import clamp_logit_scale_

    cap = math.log(100.0)
    module = torch.nn.Module()
    module.logit_scale = torch.nn.Parameter(torch.tensor([cap - 0.01]))
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5), config={
        "train_batch_size": 1, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True})
    seen = []
    for direction in (-1.0, -1.0, 1.0):  # up, up, then down
        loss = direction * engine.module.logit_scale.sum()
        engine.backward(loss)
        engine.step()
        clamp_logit_scale_(engine.module.logit_scale, cap)
        seen.append((float(engine.module.logit_scale), float(safe_get_full_fp32_param(engine.module.logit_scale))))
    return seen


def test_temperature_clamp_reaches_the_optimizers_master_copy():
    from multiproc import run_ranks

    (seen,) = run_ranks(_clamp_reaches_the_optimizer, world_size=1)
    cap = math.log(100.0)
    assert seen[0] == pytest.approx((cap, cap)) and seen[1] == pytest.approx((cap, cap))
    assert seen[2] == pytest.approx((cap - 0.5, cap - 0.5))  # one SGD step down from the cap, not from above it
