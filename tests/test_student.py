"""The student and its heads: shapes, the clamp on the temperature, and loading a Hugging Face CLIPModel."""
import math

import torch
from transformers import CLIPConfig, CLIPModel

from kclip.config import Config
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.student import clamped_scale
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


def test_logit_scale_clamped_in_forward_with_zero_gradient_above_max():
    log_scale = torch.tensor(math.log(200.0), requires_grad=True)
    scale = clamped_scale(log_scale, math.log(100.0))
    scale.backward()
    assert abs(scale.item() - 100.0) < 1e-4
    assert log_scale.grad.item() == 0.0


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
