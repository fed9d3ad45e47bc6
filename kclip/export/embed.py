"""`kclip embed --model PATH (--images DIR | --texts FILE) --out X.npy`: L2-normalised embeddings, float32 [n, d].

--images: every image file under DIR (recursive, sorted by relative path); row i of X.npy is line i of X.paths.txt,
written next to it. --texts: row i is line i of FILE. PATH: an exported folder, a run folder or a step folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from kclip import console
from kclip.export.format import ModelLoadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: no such folder {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kclip embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported folder (kclip export), run folder or step folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images")
    source.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--batch-size", type=int, default=64)
    console.add_verbose_flag(p)
    args = console.parse_args(p, argv)
    # The model code imports torch: after parsing, so that --help and argument errors answer at once.
    from kclip import dist
    from kclip.export.load import embed_image_files, encode_texts, load_model
    from kclip.train.checkpoint import CheckpointError

    out = Path(args.out)
    try:
        loaded = load_model(args.model, dist.device())
        if args.images:
            files = image_files(Path(args.images))
            emb = embed_image_files(loaded, files, args.batch_size)
            rows = [str(f.relative_to(args.images)) for f in files]
        else:
            rows = Path(args.texts).read_text().splitlines()
            if not rows:
                raise ValueError(f"--texts: {args.texts} is empty")
            emb = encode_texts(loaded.model, loaded.tokenizer, rows, args.batch_size)
    except (ModelLoadError, CheckpointError, OSError, ValueError) as e:
        print(f"kclip embed: error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb.numpy().astype(np.float32))
    if args.images:
        out.with_suffix(".paths.txt").write_text("".join(r + "\n" for r in rows))
    print(json.dumps({"out": str(out), "rows": len(rows), "dim": int(emb.shape[1])}))
    return 0
