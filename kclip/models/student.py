"""The CLIP student: an image tower and a text tower projected into one embedding space, and a learnable temperature.

Two flavours share one interface (`encode_image`, `encode_text`, `logit_scale`):
- `DualEncoder`: a timm image tower + a transformers CLIP text transformer built from config (trained from scratch,
  or from a timm checkpoint for the image side);
- `HFCLIPStudent`: a Hugging Face `CLIPModel` checkpoint, which is what the paper fine-tunes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import timm
import torch
import torch.nn as nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from kclip.config import Config, StudentConfig
from kclip.config.preflight import weight_files
from kclip.tokenizers import student_tokenizer, student_tokenizer_spec

# A run folder's copy of its Hugging Face CLIP student's config and tokenizer, without weights (the checkpoints hold
# those): the run's checkpoints load, evaluate and export after the student.hf_clip folder has moved or gone.
RUN_HF_CLIP = "hf_clip"
# A run folder's copy of a student tokenizer read from files (student.tokenizer=teacher or a folder): the config names
# those files by a path that may be relative to where training was launched, or that may have moved since.
RUN_TOKENIZER = "tokenizer"


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last non-pad token (right padding). Under a causal text transformer that token has
    seen the whole caption; unlike CLIP's argmax-of-EOT trick it works for any tokenizer."""
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# The temperature is kept as a 1-element tensor, not a 0-dim one: DeepSpeed's initial parameter broadcast views every
# parameter as bytes, which a 0-dim tensor cannot do (deepspeed 0.19.8, engine._broadcast_model).


def image_tower_kwargs(cfg: StudentConfig) -> dict:
    """The architecture arguments a DualEncoder gives timm.create_model besides num_classes=0: student.
    image_model_kwargs, and a ViT's input size (its position embeddings are sized for it)."""
    kwargs = dict(cfg.image_model_kwargs)
    if "vit" in cfg.image_model:
        kwargs.setdefault("img_size", cfg.image_size)
    return kwargs


class DualEncoder(nn.Module):
    def __init__(self, cfg: StudentConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        kwargs = image_tower_kwargs(cfg)
        pretrained = bool(cfg.pretrained_image)
        if isinstance(cfg.pretrained_image, str):
            # Offline clusters keep timm weights as local files; timm reads them through the pretrained_cfg overlay.
            if not os.path.isfile(cfg.pretrained_image):
                raise FileNotFoundError(f"student.pretrained_image: no such file {cfg.pretrained_image}")
            kwargs["pretrained_cfg_overlay"] = dict(file=cfg.pretrained_image)
        self.visual = timm.create_model(cfg.image_model, pretrained=pretrained, num_classes=0, **kwargs)
        text_cfg = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.text_max_len,
            pad_token_id=pad_token_id,
        )
        self.text = CLIPTextModel(text_cfg)
        self.image_proj = nn.Linear(self.visual.num_features, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor([cfg.init_logit_scale]))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.set_grad_checkpointing(enabled)
        if enabled:
            self.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.text.gradient_checkpointing_disable()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.visual(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(last_token_pool(hidden, attention_mask))


class HFCLIPStudent(nn.Module):
    """A pretrained Hugging Face CLIPModel behind the DualEncoder interface."""

    def __init__(self, path: str):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"student.hf_clip: no such folder {path}")
        # A folder without weights is a run's RUN_HF_CLIP copy: the architecture, whose weights the checkpoint brings.
        self.clip = CLIPModel.from_pretrained(path) if weight_files(path) else CLIPModel(CLIPConfig.from_pretrained(path))
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.clip.gradient_checkpointing_disable()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixels)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)


def build_student(cfg: StudentConfig, tokenizer) -> nn.Module:
    """The student towers for `cfg`; `tokenizer` fixes the text vocabulary of a DualEncoder."""
    if cfg.hf_clip:
        return HFCLIPStudent(cfg.hf_clip)
    return DualEncoder(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def save_student_copy(cfg: Config, run_dir: Path) -> None:
    """Write what a checkpoint of this run needs besides its config and weights: RUN/hf_clip/ (RUN_HF_CLIP) for a
    Hugging Face CLIP student, RUN/tokenizer/ (RUN_TOKENIZER) for a student tokenizer read from files; nothing for a
    byte-tokenizer student, which the config alone describes. Rank 0, before training."""
    if cfg.student.hf_clip:
        out = run_dir / RUN_HF_CLIP
    elif student_tokenizer_spec(cfg) != "byte":
        out = run_dir / RUN_TOKENIZER
    else:
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.student.hf_clip:
        CLIPConfig.from_pretrained(cfg.student.hf_clip).save_pretrained(tmp)
    student_tokenizer(cfg).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def embed_dim(student: nn.Module) -> int:
    if isinstance(student, HFCLIPStudent):
        return student.clip.config.projection_dim
    return student.image_proj.out_features


@torch.no_grad()
def clamp_logit_scale_(log_scale: nn.Parameter, max_log_scale: float) -> None:
    """Clamp the log temperature in place after an optimizer step, as open_clip does.

    Clamping inside the forward instead zeroes the gradient above the cap: a model that once crossed it (or a
    pretrained CLIP loaded at it, 4.6052 = log 100) could never come down again, however much the loss asked.
    The optimizer updates its fp32 master copy and copies it into the module afterwards, so both are set: the
    module's for the next forward, the master's (through DeepSpeed's fragment API) so the next step starts there.
    """
    # A meta tensor (benchmarks/scaling_table.py counts parameters without memory) has no value to clamp.
    if log_scale.is_meta or float(log_scale.max()) <= max_log_scale:
        return
    from deepspeed.utils import safe_set_full_fp32_param

    clamped = log_scale.detach().float().clamp(max=max_log_scale)
    log_scale.copy_(clamped)
    safe_set_full_fp32_param(log_scale, clamped)
