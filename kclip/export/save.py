"""`kclip export CHECKPOINT OUT`: write a trained student in kclip's format and/or open_clip's (--format).

kclip: the folder kclip/export/format.py describes (kclip.load reads it). open_clip: its `local-dir:` form
(kclip/export/open_clip.py; open_clip and clip_benchmark read it). `auto`, the default, writes both, or kclip's alone
with one line saying why open_clip cannot represent the student. CHECKPOINT is a run folder (its latest checkpoint), a
step folder or an export in kclip's format. OUT is written under a temporary name and renamed, so it is never
half-written."""
from __future__ import annotations

import argparse
import copy
import json
import logging
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
    NotExpressible,
)

# The model code (torch, transformers) is imported where used, so that `kclip export --help` answers at once.
if TYPE_CHECKING:
    from kclip.export.load import LoadedModel
    from kclip.models.student import HFCLIPStudent

log = logging.getLogger(__name__)

FORMATS = ("auto", "kclip", "open_clip")


def as_trained(tokenizer, max_len: int):
    """A copy of `tokenizer` that, saved, tokenizes as training did: its `model_max_length` is the run's
    student.text_max_len, so a Hugging Face user's `truncation=True` cuts where the student was trained (a CLIP folder's
    own says 77), and it pads on the right (kclip always does; open_clip pads as the saved tokenizer says, and a left-
    padded caption would sit at other positions). A copy, because the run's tokenizer object is shared
    (load_tokenizer caches it)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_len
    # save_pretrained writes what init_kwargs hold: the attribute alone is lost, and a reloaded Llama-family tokenizer
    # pads on the left again.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "right"
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


def write_kclip(loaded: LoadedModel, tokenizer, out: Path) -> None:
    from kclip.models.student import HFCLIPStudent

    student = loaded.model.student
    kind = "hf_clip" if isinstance(student, HFCLIPStudent) else "dual_encoder"
    if kind == "hf_clip":
        write_hf(student, loaded.cfg.student.max_logit_scale, tokenizer, loaded.preprocess, out / EXPORT_HF)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(out / EXPORT_WEIGHTS))
    tokenizer.save_pretrained(out / EXPORT_TOKENIZER)
    (out / EXPORT_PREPROCESS).write_text(json.dumps(loaded.preprocess, indent=1))
    spec = {"format": FORMAT_VERSION, "student": kind, "source": loaded.source, "step": loaded.step,
            "config": to_dict(loaded.cfg)}
    (out / EXPORT_SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))


def export_model(loaded: LoadedModel, out: str | Path, fmt: str = "auto") -> Path:
    """Write `loaded` at `out` (which must not exist or be empty) in `fmt` (FORMATS). Raises NotExpressible when
    `fmt` is open_clip and open_clip cannot represent the student; under `auto` that is a logged line instead."""
    from kclip.export.open_clip import open_clip_form, write_open_clip

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tokenizer = as_trained(loaded.tokenizer.hf, loaded.cfg.student.text_max_len)
    open_clip = None
    if fmt in ("auto", "open_clip"):  # decided before anything is written: a refused format leaves no folder
        try:
            open_clip = open_clip_form(loaded.model.student, loaded.cfg, tokenizer, loaded.preprocess, out)
        except NotExpressible as e:
            if fmt == "open_clip":
                raise
            log.warning("%s; not written", e)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if fmt in ("auto", "kclip"):
        write_kclip(loaded, tokenizer, tmp)
    if open_clip is not None:
        write_open_clip(open_clip, tokenizer, tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def export(checkpoint: str | Path, out: str | Path, fmt: str = "auto") -> Path:
    from kclip.export.load import load_model

    return export_model(load_model(checkpoint, "cpu"), out, fmt)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kclip export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run folder, checkpoint step folder or exported folder")
    parser.add_argument("out", help="output folder (absent or empty)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="kclip (kclip.load), open_clip (open_clip / clip_benchmark `local-dir:OUT`), or auto: "
                        "both, or kclip alone with a line saying why open_clip cannot represent the student")
    console.add_verbose_flag(parser)
    args = console.parse_args(parser, argv)
    from kclip.train.checkpoint import CheckpointError

    try:
        out = export(args.checkpoint, args.out, args.format)
    except (ModelLoadError, CheckpointError, OSError, ValueError) as e:
        print(f"kclip export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0
