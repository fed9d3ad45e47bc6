"""`kclip export CHECKPOINT OUT`: write the folder kclip/export/format.py describes. CHECKPOINT is a run folder (its
latest checkpoint), a step folder or another export. OUT is written under a temporary name and renamed, so it is
never half-written."""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from kclip import console
from kclip.config import to_dict
from kclip.export.format import (
    EXPORT_HF,
    EXPORT_PREPROCESS,
    EXPORT_SPEC,
    EXPORT_TOKENIZER,
    EXPORT_WEIGHTS,
    FORMAT_VERSION,
    ModelLoadError,
)

# The model code (torch, transformers) is imported where used, so that `kclip export --help` answers at once.
if TYPE_CHECKING:
    from kclip.export.load import LoadedModel
    from kclip.models.student import HFCLIPStudent


def truncating_at(tokenizer, max_len: int):
    """A copy of `tokenizer` whose saved `model_max_length` is the run's student.text_max_len: what a Hugging Face
    user's `truncation=True` then cuts at is what the student was trained on (a CLIP folder's own says 77). A copy,
    because the run's tokenizer object is shared (load_tokenizer caches it)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_len
    return tokenizer


def write_hf(student: HFCLIPStudent, max_log_scale: float, tokenizer, preprocess: dict, out: Path) -> None:
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    state = student.clip.state_dict()
    state["logit_scale"] = state["logit_scale"].clamp(max=max_log_scale).reshape(())
    student.clip.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)
    size = preprocess["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       resample=PILImageResampling.BICUBIC, image_mean=preprocess["mean"],
                       image_std=preprocess["std"]).save_pretrained(out)


def export_model(loaded: LoadedModel, out: str | Path) -> Path:
    """Write `loaded` as an export folder at `out` (which must not exist or be empty)."""
    from kclip.models.student import HFCLIPStudent

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student = loaded.model.student
    kind = "hf_clip" if isinstance(student, HFCLIPStudent) else "dual_encoder"
    tokenizer = truncating_at(loaded.tokenizer.hf, loaded.cfg.student.text_max_len)
    if kind == "hf_clip":
        write_hf(student, loaded.cfg.student.max_logit_scale, tokenizer, loaded.preprocess, tmp / EXPORT_HF)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp / EXPORT_WEIGHTS))
    tokenizer.save_pretrained(tmp / EXPORT_TOKENIZER)
    (tmp / EXPORT_PREPROCESS).write_text(json.dumps(loaded.preprocess, indent=1))
    spec = {"format": FORMAT_VERSION, "student": kind, "source": loaded.source, "step": loaded.step,
            "config": to_dict(loaded.cfg)}
    (tmp / EXPORT_SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def export(checkpoint: str | Path, out: str | Path) -> Path:
    from kclip.export.load import load_model

    return export_model(load_model(checkpoint, "cpu"), out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kclip export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run folder, checkpoint step folder or exported folder")
    parser.add_argument("out", help="output folder (absent or empty)")
    console.add_verbose_flag(parser)
    args = console.parse_args(parser, argv)
    from kclip.train.checkpoint import CheckpointError

    try:
        out = export(args.checkpoint, args.out)
    except (ModelLoadError, CheckpointError, OSError, ValueError) as e:
        print(f"kclip export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0
