"""Students for evaluation, export and embedding, read from a run folder, a checkpoint step folder or an export.

- run folder (has `checkpoints/`): its `latest` complete checkpoint;
- step folder (`checkpoints/step_XXXXXXXX/` with COMPLETE): the fp32 master weights, as saved at ZeRO stage 0 or
  reassembled from the optimizer partitions of all ranks by DeepSpeed's zero_to_fp32 (exact even for bf16 runs, whose
  module copy is bf16); the config comes from the checkpoint's client state;
- exported folder (`kclip export`, has kclip_model.yaml): see kclip/export/format.py for its layout.

Only the student towers are built (no distillation/concept heads): encode_image/encode_text give L2-normalised
embeddings exactly as in training. A checkpoint of a Hugging Face CLIP student takes its architecture and tokenizer
from its run's copy (`RUN/hf_clip/`, written when training starts) and its weights from the checkpoint; runs from
before that copy need the `student.hf_clip` folder they were fine-tuned from. Likewise a student tokenizer read from
files (the teacher's, or a folder) comes from the run's `RUN/tokenizer/`, so a relative `teacher.path` need not
resolve from where the checkpoint is read.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from kclip import console
from kclip.config import Config, from_dict
from kclip.data.loader import tokenize
from kclip.export.format import (
    EXPORT_HF,
    EXPORT_PREPROCESS,
    EXPORT_SPEC,
    EXPORT_TOKENIZER,
    EXPORT_WEIGHTS,
    MODEL_STATES,
    ModelLoadError,
    build_preprocess,
    preprocess_spec,
    read_model_states,
)
from kclip.models.knowledge_clip import KnowledgeCLIP
from kclip.models.student import RUN_HF_CLIP, RUN_TOKENIZER
from kclip.tokenizers import load_tokenizer, student_tokenizer
from kclip.train import checkpoint

log = logging.getLogger(__name__)


class TextTokenizer:
    """texts -> {"input_ids", "attention_mask"} [B, <= max_len], right-padded and truncated as in training."""

    def __init__(self, tokenizer, max_len: int):
        self.hf = tokenizer
        self.max_len = max_len

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask, _ = tokenize(self.hf, list(texts), self.max_len)
        return {"input_ids": ids, "attention_mask": mask}


@dataclass
class LoadedModel:
    model: KnowledgeCLIP  # student towers only, eval mode, on the requested device
    tokenizer: TextTokenizer
    cfg: Config  # the training run's config (teacher settings for the text probes; data paths may be stale)
    source: str
    preprocess: dict  # preprocess_spec(): how images must be prepared for this student
    step: int | None = None
    concepts: dict | None = None  # ConceptBank.state_dict() saved with a checkpoint (None for exports)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def build_encoder(cfg: Config, tokenizer, hf_clip: str | None = None) -> KnowledgeCLIP:
    """The student towers of `cfg` without heads and without fetching pretrained weights (they are loaded after)."""
    cfg = copy.deepcopy(cfg)
    cfg.loss.distill_weight = cfg.loss.concept_weight = 0.0
    cfg.student.pretrained_image = False
    cfg.student.grad_checkpointing = False
    if hf_clip is not None:
        cfg.student.hf_clip = hf_clip
    return KnowledgeCLIP(cfg, tokenizer, None)


def locate(path: str | Path) -> tuple[str, Path]:
    """("export" | "checkpoint", folder) for a run folder, a checkpoint step folder or an exported folder."""
    path = Path(path)
    if (path / EXPORT_SPEC).is_file():
        return "export", path
    if (path / "checkpoints").is_dir():
        return "checkpoint", checkpoint.resolve(path, "latest")
    if (path / MODEL_STATES).is_file() or (path / checkpoint.COMPLETE).exists():
        return "checkpoint", checkpoint.resolve(path.parent, str(path))
    raise ModelLoadError(f"{path}: not a run folder, a checkpoint step folder or an exported model")


def student_weights(tag_dir: Path, module_state: dict) -> dict[str, torch.Tensor]:
    """The `student.*` weights of a checkpoint as float32, keys relative to the student module.

    ZeRO stage 0 in fp32 keeps no partitions: its module state is the master copy itself. Partitioned optimizers
    (ZeRO-1/2, and the bf16 optimizer at any stage) hold the fp32 master weights in their partitions, reassembled by
    DeepSpeed's zero_to_fp32, because the module copy is in the training precision (bf16 for bf16 runs); if DeepSpeed
    cannot reassemble them (an optimizer layout it does not know, missing partition files), the module copy, with a
    warning."""
    if not checkpoint.optimizer_partitioned(tag_dir):
        return _student_part(module_state)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with console.printed_to_log("deepspeed.utils.zero_to_fp32"):  # it reports progress with print()
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        log.warning("%s: fp32 master weights not reassembled (%s: %s); using the module weights", tag_dir,
                    type(e).__name__, e)
        state = module_state
    return _student_part(state)


def _student_part(state: dict) -> dict[str, torch.Tensor]:
    return {k[len("student."):]: v.detach().float() for k, v in state.items() if k.startswith("student.")}


def load_checkpoint_model(tag_dir: Path, device) -> LoadedModel:
    client = read_model_states(tag_dir)
    if "config" not in client:
        raise ModelLoadError(f"{tag_dir}: checkpoint has no kclip config in its client state")
    cfg = from_dict(client["config"])
    run_dir = tag_dir.absolute().parent.parent
    hf_clip = str(run_dir / RUN_HF_CLIP) if cfg.student.hf_clip and (run_dir / RUN_HF_CLIP).is_dir() else None
    if hf_clip:
        tokenizer = load_tokenizer(hf_clip)
    elif (run_dir / RUN_TOKENIZER).is_dir():
        tokenizer = load_tokenizer(str(run_dir / RUN_TOKENIZER))
    else:  # a byte-tokenizer run, or one from before the run kept its tokenizer
        tokenizer = student_tokenizer(cfg)
    model = build_encoder(cfg, tokenizer, hf_clip=hf_clip)
    model.student.load_state_dict(student_weights(tag_dir, client["module"]))
    return LoadedModel(model.to(device).eval(), TextTokenizer(tokenizer, cfg.student.text_max_len), cfg,
                       source=str(tag_dir), preprocess=preprocess_spec(cfg.student.image_size),
                       step=client.get("step"), concepts=client.get("concepts"))


def load_exported_model(folder: Path, device) -> LoadedModel:
    spec = yaml.safe_load((folder / EXPORT_SPEC).read_text())
    cfg = from_dict(spec["config"])
    tokenizer = load_tokenizer(str(folder / EXPORT_TOKENIZER))
    if spec["student"] == "hf_clip":
        model = build_encoder(cfg, tokenizer, hf_clip=str(folder / EXPORT_HF))
    else:
        from safetensors.torch import load_file

        model = build_encoder(cfg, tokenizer)
        model.student.load_state_dict(load_file(str(folder / EXPORT_WEIGHTS)))
    return LoadedModel(model.to(device).eval(), TextTokenizer(tokenizer, cfg.student.text_max_len), cfg,
                       source=str(folder), preprocess=json.loads((folder / EXPORT_PREPROCESS).read_text()),
                       step=spec.get("step"))


def load_model(path: str | Path, device="cpu") -> LoadedModel:
    kind, folder = locate(path)
    if kind == "export":
        return load_exported_model(folder, device)
    return load_checkpoint_model(folder, device)


def load(path: str | Path, device="cpu"):
    """(model, tokenizer, preprocess) like open_clip.create_model_and_transforms:
    `model.encode_image(torch.stack([preprocess(pil) ...]))`, `model.encode_text(**tokenizer(["a dog"]))`."""
    loaded = load_model(path, device)
    return loaded.model, loaded.tokenizer, build_preprocess(loaded.preprocess)


@torch.no_grad()
def encode_texts(model: KnowledgeCLIP, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [n, d] (float32, on CPU)."""
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(texts), batch_size)
    for start in console.progress(len(starts), "embedding texts", "batch", iterable=starts, leave=False):
        enc = tokenizer(texts[start : start + batch_size])
        out.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def encode_images(model: KnowledgeCLIP, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings [n, d] (float32, on CPU) of a batch of preprocessed pixels."""
    return model.encode_image(pixels.to(next(model.parameters()).device)).float().cpu()


def embed_image_files(loaded: LoadedModel, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised embeddings [n, d] of image files, prepared with the model's own preprocessing."""
    preprocess = build_preprocess(loaded.preprocess)
    out = []
    starts = range(0, len(paths), batch_size)
    for start in console.progress(len(starts), "embedding images", "batch", iterable=starts, leave=False):
        pixels = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as img:
                pixels.append(preprocess(img))
        out.append(encode_images(loaded.model, torch.stack(pixels)))
    return torch.cat(out) if out else torch.empty(0, 0)
