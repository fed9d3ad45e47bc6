"""open_clip's `local-dir:` form of a student, read by the stock open_clip_torch (3.3.0) and clip_benchmark:
`open_clip.create_model_and_transforms("local-dir:OUT")`, `open_clip.get_tokenizer("local-dir:OUT")`,
`clip_benchmark eval --model local-dir:OUT`.

OUT/
  open_clip_config.json        model_cfg (architecture) and preprocess_cfg
  open_clip_model.safetensors  the weights under open_clip's names; first in open_clip's order of preferred files, so
                               the DualEncoder's own model.safetensors beside it is never read instead
  tokenizer files              the student tokenizer (open_clip's HFTokenizer reads a local-dir model's tokenizer
                               from the folder itself), truncating at the run's student.text_max_len, the context
  timm_tower/config.json       [DualEncoder whose timm model takes architecture arguments] timm's own `local-dir:`
                               model config: the architecture name and student.image_model_kwargs

How the students map onto open_clip's CLIP class, exactly (same functions of the same weights):
- text: both students' text towers are Hugging Face CLIP text transformers (pre-LN blocks, causal mask, final
  LayerNorm), which is open_clip's TextTransformer: q/k/v projections concatenated into in_proj, the activation by
  `quick_gelu`, the LayerNorm eps by norm_kwargs, context_length = student.text_max_len (longer position tables are
  cut there: kclip never reads past it). Pooling: an HF CLIP student pools as Hugging Face does (the first
  eos_token_id, or the largest id when eos_token_id is 2), which open_clip calls `eos` and `argmax`. A DualEncoder
  pools the last non-pad token; open_clip's `eos` pools the first end-of-text token, the same one exactly when the
  tokenizer ends every caption with its end-of-text id and writes it nowhere before (the byte tokenizer and CLIP's do,
  and so does the student's copy of a Llama-family tokenizer such as SmolLM2's: kclip.tokenizers.ending_with_eos).
  A caption holding the end-of-text token's literal text would differ. open_clip pads every caption to the context
  (kclip to the batch's longest): under the causal mask no token before the pooled one sees the padding. open_clip's
  tokenizer first cleans a text (ftfy, HTML entities, runs of whitespace to one space), kclip's does not: texts that
  cleaning changes embed differently.
- image, HF CLIP student: open_clip's own VisionTransformer (the same CLIP architecture).
- image, DualEncoder: open_clip's TimmModel, i.e. the same timm model (open_clip never applies `quick_gelu` to
  timm towers), with image_proj as its head's linear projection. Not open_clip's own VisionTransformer: that takes its
  activation from the same `quick_gelu` flag as the text tower, and kclip's text tower uses quick GELU where timm's
  ViTs use exact GELU. TimmModel passes no architecture arguments to timm, so a tower built with some (the demo's
  patch 8, depth 4, width 128) is named by timm's `local-dir:` model source, an absolute path to OUT/timm_tower: the
  folder works where `kclip export` wrote it (export again after moving it; timm 1.0.31 reads such names).
- preprocessing: kclip's evaluation transform (shorter side to the image size, bicubic, centre crop, CLIP mean/std)
  is open_clip's resize_mode `shortest`. open_clip converts to RGB after resizing and drops an alpha channel instead
  of compositing onto white, so images with transparency are prepared differently; opaque ones identically.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kclip.config import Config
from kclip.config.preflight import POOLING_PROBES
from kclip.export.format import NotExpressible, known_geometry
from kclip.models.student import HFCLIPStudent, image_tower_kwargs
from kclip.tokenizers import student_tokenizer_spec

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TIMM_TOWER = "timm_tower"
# Hugging Face's hidden_act -> open_clip's quick_gelu flag (QuickGELU, or nn.GELU: exact, as Hugging Face's "gelu").
QUICK_GELU = {"quick_gelu": True, "gelu": False}
# Hugging Face CLIP encoder layer -> open_clip ResidualAttentionBlock, besides q/k/v (weight and bias each).
BLOCK_RENAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


class Weights:
    """A student's state dict taken key by key: a weight no rule took is found (check_all_taken), not dropped."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = dict(state)

    def take(self, key: str) -> torch.Tensor:
        return self.state.pop(key).detach()

    def blocks(self, src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
        """Hugging Face CLIP encoder layers `{src}{i}.` as open_clip transformer blocks `{dst}{i}.`."""
        out = {}
        for i in range(layers):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for part in ("weight", "bias"):
                qkv = [self.take(f"{s}self_attn.{x}_proj.{part}") for x in "qkv"]
                out[f"{d}attn.in_proj_{part}"] = torch.cat(qkv)
                out.update({f"{d}{new}.{part}": self.take(f"{s}{old}.{part}") for old, new in BLOCK_RENAMES.items()})
        return out

    def text(self, src: str, text_config, max_len: int) -> dict[str, torch.Tensor]:
        """A Hugging Face CLIPTextTransformer under `src` as open_clip CLIP's text keys (no projection)."""
        return {
            "token_embedding.weight": self.take(f"{src}embeddings.token_embedding.weight"),
            "positional_embedding": self.take(f"{src}embeddings.position_embedding.weight")[:max_len],
            **self.blocks(f"{src}encoder.layers.", "transformer.resblocks.", text_config.num_hidden_layers),
            "ln_final.weight": self.take(f"{src}final_layer_norm.weight"),
            "ln_final.bias": self.take(f"{src}final_layer_norm.bias"),
        }

    def check_all_taken(self) -> None:
        if self.state:
            raise NotExpressible(f"open_clip: the student has weights open_clip's model has no place for: "
                                 f"{', '.join(sorted(self.state)[:3])}")


def tower_cfg(config, **extra) -> dict:
    """The width, depth, heads, MLP ratio and LayerNorm eps of a Hugging Face CLIP tower in open_clip's terms."""
    ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * ratio) != config.intermediate_size:
        raise NotExpressible(f"open_clip: MLP width {config.intermediate_size} is no open_clip mlp_ratio of "
                             f"width {config.hidden_size}")
    return {"width": config.hidden_size, "layers": config.num_hidden_layers, "mlp_ratio": ratio,
            "norm_kwargs": {"eps": config.layer_norm_eps}, **extra}


def quick_gelu(*configs) -> bool:
    acts = {c.hidden_act for c in configs}
    if len(acts) != 1 or not acts <= set(QUICK_GELU):
        raise NotExpressible(f"open_clip: activation {' and '.join(sorted(map(str, acts)))}; open_clip's towers take "
                             f"one of {', '.join(QUICK_GELU)}, the same for both")
    return QUICK_GELU[acts.pop()]


def eos_pooling_id(tokenizer, spec: str, max_len: int) -> int:
    """The end-of-text id at which open_clip's `eos` pooling finds the token kclip's last_token_pool reads: every
    caption, also one truncated at `max_len`, must end with it and hold it nowhere else."""
    eos = tokenizer.eos_token_id
    for probe in POOLING_PROBES:
        ids = tokenizer(probe, truncation=True, max_length=max_len)["input_ids"]
        if eos is None or ids[-1] != eos or eos in ids[:-1]:
            raise NotExpressible(
                f"open_clip: the student tokenizer ({spec}) does not end every caption with an end-of-text id it "
                f"writes nowhere else ({probe[:20].strip()!r} -> {ids[:3]}...{ids[-3:]}, eos_token_id {eos}); "
                f"open_clip pools a caption at its first end-of-text token, the DualEncoder at its last token")
    return eos


def timm_tower_name(cfg: Config, folder: Path) -> tuple[str, dict | None]:
    """(timm_model_name for open_clip, the timm `local-dir:` config to write at folder/TIMM_TOWER, or None when the
    plain timm name already builds the DualEncoder's image model)."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    s = cfg.student
    kwargs = image_tower_kwargs(s)
    default = get_pretrained_cfg(s.image_model)
    if default is not None and default.input_size and kwargs in ({}, {"img_size": default.input_size[-1]}):
        return s.image_model, None
    architecture = split_model_name_tag(s.image_model)[0]
    config = {"architecture": architecture, "num_classes": 0, "pretrained_cfg": {}, "model_args": kwargs}
    return f"local-dir:{(folder / TIMM_TOWER).absolute()}", config


def dual_encoder_form(student, cfg: Config, tokenizer, folder: Path) -> tuple[dict, dict, dict | None]:
    text_config = student.text.config
    weights = Weights(student.state_dict())
    state = {
        **{f"visual.trunk.{k[len('visual.'):]}": weights.take(k) for k in list(weights.state)
           if k.startswith("visual.")},
        "visual.head.proj.weight": weights.take("image_proj.weight"),
        **weights.text("text.text_model.", text_config, cfg.student.text_max_len),
        "text_projection": weights.take("text_proj.weight").T,
        "logit_scale": weights.take("logit_scale"),
    }
    weights.check_all_taken()
    timm_name, timm_config = timm_tower_name(cfg, folder)
    text_cfg = tower_cfg(text_config, heads=text_config.num_attention_heads, vocab_size=text_config.vocab_size,
                         context_length=cfg.student.text_max_len, pool_type="eos", pad_id=tokenizer.pad_token_id,
                         eos_id=eos_pooling_id(tokenizer, student_tokenizer_spec(cfg), cfg.student.text_max_len))
    model_cfg = {
        "embed_dim": cfg.student.embed_dim,
        "quick_gelu": quick_gelu(text_config),  # the text tower's: open_clip builds timm towers with timm's own
        "vision_cfg": {"image_size": cfg.student.image_size, "timm_model_name": timm_name,
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "timm_proj_bias": False},
        "text_cfg": text_cfg,
    }
    return model_cfg, state, timm_config


def hf_clip_form(student: HFCLIPStudent, cfg: Config, tokenizer) -> tuple[dict, dict, None]:
    config = student.clip.config
    text, vision = config.text_config, config.vision_config
    weights = Weights(student.clip.state_dict())
    v = "vision_model."
    state = {
        "visual.class_embedding": weights.take(f"{v}embeddings.class_embedding"),
        "visual.conv1.weight": weights.take(f"{v}embeddings.patch_embedding.weight"),
        "visual.positional_embedding": weights.take(f"{v}embeddings.position_embedding.weight"),
        "visual.ln_pre.weight": weights.take(f"{v}pre_layrnorm.weight"),
        "visual.ln_pre.bias": weights.take(f"{v}pre_layrnorm.bias"),
        **weights.blocks(f"{v}encoder.layers.", "visual.transformer.resblocks.", vision.num_hidden_layers),
        "visual.ln_post.weight": weights.take(f"{v}post_layernorm.weight"),
        "visual.ln_post.bias": weights.take(f"{v}post_layernorm.bias"),
        "visual.proj": weights.take("visual_projection.weight").T,
        **weights.text("text_model.", text, cfg.student.text_max_len),
        "text_projection": weights.take("text_projection.weight").T,
        "logit_scale": weights.take("logit_scale"),
    }
    weights.check_all_taken()
    # Hugging Face tells configs written before eos_token_id was fixed by eos_token_id == 2: those pool the largest id.
    pooling = {"pool_type": "argmax"} if text.eos_token_id == 2 else {"pool_type": "eos", "eos_id": text.eos_token_id}
    model_cfg = {
        "embed_dim": config.projection_dim,
        "quick_gelu": quick_gelu(text, vision),
        "vision_cfg": tower_cfg(vision, head_width=vision.hidden_size // vision.num_attention_heads,
                                patch_size=vision.patch_size, image_size=vision.image_size),
        "text_cfg": tower_cfg(text, heads=text.num_attention_heads, vocab_size=text.vocab_size,
                              context_length=cfg.student.text_max_len, pad_id=tokenizer.pad_token_id, **pooling),
    }
    return model_cfg, state, None


def preprocess_cfg(spec: dict) -> dict:
    """open_clip's preprocess_cfg for kclip's preprocess spec (kclip.export.format.preprocess_spec)."""
    if not known_geometry(spec):
        raise NotExpressible(f"open_clip: no preprocess_cfg for the preprocessing {spec}")
    return {"size": spec["image_size"], "mode": "RGB", "mean": spec["mean"], "std": spec["std"],
            "interpolation": "bicubic", "resize_mode": "shortest"}


def open_clip_form(student, cfg: Config, tokenizer, preprocess: dict, folder: Path) -> dict:
    """Everything the open_clip form of `student` holds, before anything is written: {"config" (the JSON), "state"
    (open_clip's weights), "timm_tower" (timm's config or None)}. `folder` is where the export will finally lie.
    Raises NotExpressible, one line, for a student open_clip cannot represent exactly."""
    if isinstance(student, HFCLIPStudent):
        model_cfg, state, timm_config = hf_clip_form(student, cfg, tokenizer)
    else:
        model_cfg, state, timm_config = dual_encoder_form(student, cfg, tokenizer, folder)
    # The temperature as open_clip keeps it (0-dim), clamped as training clamps it after every step.
    state["logit_scale"] = state["logit_scale"].clamp(max=cfg.student.max_logit_scale).reshape(())
    # Any non-empty name: open_clip reads a local-dir model's tokenizer from the folder, whatever the name says.
    model_cfg["text_cfg"]["hf_tokenizer_name"] = student_tokenizer_spec(cfg)
    return {"config": {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(preprocess)}, "state": state,
            "timm_tower": timm_config}


def write_open_clip(form: dict, tokenizer, out: Path) -> None:
    """Write an `open_clip_form` into `out`; `tokenizer` as training reads it (kclip.export.save.as_trained)."""
    from safetensors.torch import save_file

    # Copies: a cut position table or a transposed projection is a view of the student's parameter.
    save_file({k: v.cpu().contiguous().clone() for k, v in form["state"].items()}, str(out / OPEN_CLIP_WEIGHTS))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(form["config"], indent=1))
    tokenizer.save_pretrained(out)
    if form["timm_tower"] is not None:
        (out / TIMM_TOWER).mkdir()
        (out / TIMM_TOWER / "config.json").write_text(json.dumps(form["timm_tower"], indent=1))
