"""The export format: a self-contained student folder, loadable without DeepSpeed or the run folder.

OUT/
  kclip_model.yaml    format, student kind (dual_encoder | hf_clip), source checkpoint and step, the run's config
  model.safetensors   the DualEncoder's weights (keys of the student module)           [dual_encoder]
  hf/                 CLIPModel + tokenizer + CLIPImageProcessor, save_pretrained      [hf_clip]
                      (CLIPModel.from_pretrained(OUT/hf) works; logit_scale is 0-dim again and clamped to the
                      training maximum, since Hugging Face's forward does not clamp it)
  tokenizer/          the student tokenizer (save_pretrained; kclip.tokenizers.load_tokenizer reads it)
                      (here and in hf/, model_max_length is the run's student.text_max_len)
  preprocess.json     image preprocessing: size, shorter-side bicubic resize, center crop, mean/std

Written by `kclip export` (save.py), read by `kclip.load(OUT)` -> (model, tokenizer, preprocess) (load.py). The same
folder can also hold the student in open_clip's `local-dir:` form (kclip/export/open_clip.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kclip.data.transforms import to_rgb

# timm and torchvision are imported where used: `kclip export`, `embed` and `eval` import this module before they parse
# their arguments, and their --help must not wait for torch.
if TYPE_CHECKING:
    from torchvision import transforms as T

FORMAT_VERSION = 1
EXPORT_SPEC = "kclip_model.yaml"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_TOKENIZER = "tokenizer"
EXPORT_PREPROCESS = "preprocess.json"
EXPORT_HF = "hf"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module file in a checkpoint step folder


class ModelLoadError(ValueError):
    pass


def read_model_states(tag_dir: Path) -> dict:
    """A checkpoint's module file: the module weights and kclip's client state (config, step, concepts, teacher
    statistics), all tensors and plain containers. Read with torch's restricted unpickler, so that a run folder from
    someone else cannot run code when it is evaluated, exported or reported; a file that needs more is refused."""
    import pickle

    import torch

    path = tag_dir / MODEL_STATES
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "objects beyond tensors and plain containers"
        raise ModelLoadError(f"{path}: not a kclip checkpoint's module file, refused rather than unpickled "
                             f"(it could run code): {reason[:200]}") from e


class NotExpressible(ValueError):
    """An export format cannot represent this student exactly; the message says why, in one line."""


def preprocess_spec(image_size: int) -> dict:
    """The evaluation transform of kclip.data.transforms, as data (written to preprocess.json on export)."""
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {"image_size": image_size, "resize": "shorter_side", "interpolation": "bicubic", "crop": "center",
            "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD), "transparent_background": "white"}


def known_geometry(spec: dict) -> bool:
    """Whether `spec` resizes, interpolates and crops as `preprocess_spec` writes: the one geometry kclip's readers
    (build_preprocess, the open_clip form) can reproduce."""
    return (spec["resize"], spec["interpolation"], spec["crop"]) == ("shorter_side", "bicubic", "center")


def build_preprocess(spec: dict) -> T.Compose:
    """PIL image -> normalised pixels [3, s, s], from a preprocess.json spec."""
    from torchvision import transforms as T

    if not known_geometry(spec):
        raise ModelLoadError(f"unsupported preprocessing {spec}")
    size = spec["image_size"]
    return T.Compose([to_rgb, T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
