"""`kclip export-wds --data MDS --out DIR`: an evaluation split as clip_benchmark's webdataset datasets.

`clip_benchmark eval --model local-dir:EXPORT --dataset wds/NAME --dataset_root DIR/NAME` then scores a student on
what `kclip eval --checkpoint EXPORT --data MDS --label-cols ...` scores (EXPORT: `kclip export`'s open_clip form):

DIR/retrieval/   dataset_type.txt (`retrieval`); test/nshards.txt, test/{0..n-1}.tar of KEY.png + KEY.txt (the
                 image's captions, one a line)                                 -> --task zeroshot_retrieval
DIR/<column>/    per label column: classnames.txt, zeroshot_classification_templates.txt; test/nshards.txt,
                 test/{0..n-1}.tar of KEY.png + KEY.cls (class index)        -> --task zeroshot_classification

Written to match kclip eval (kclip/eval/run.py, zeroshot.py, retrieval.py):
- one sample per distinct image (a record's id without the `#k` that `kclip prepare` gives an image's further
  captions), in index order; its labels are its first record's, as kclip's zero-shot and probes take them;
- class names are kclip's: the sorted label values, each made `readable`, and a sample's class is the index of its
  label there; the templates are kclip eval's (--templates, else its defaults), `{}` written as clip_benchmark's `{c}`;
- pixels: the image decoded as kclip decodes it (RGB, transparency composited onto white) and stored as PNG, lossless,
  so open_clip's eval transform gets exactly the pixels kclip's gets.
What still differs: kclip's retrieval also counts a caption whose text is identical to one of an image's captions as a
positive for that image, clip_benchmark only the image's own captions, so on splits with repeated caption texts kclip
scores higher; a caption's line breaks are written as spaces (clip_benchmark splits a .txt into captions at them);
open_clip's tokenizer cleans texts (ftfy, HTML entities, runs of whitespace) before tokenizing, kclip's does not.
clip_benchmark's metrics: acc1 = top1, acc5 = top5 (kclip caps k at the number of classes, clip_benchmark reports nan
below 5 classes), mean_per_class_recall = mean_per_class; image_retrieval_recall@k = t2i R@k, text_retrieval_recall@k
= i2t R@k. Its default mixed precision (on a CPU, bfloat16) moves scores; --no_amp compares in float32.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

from kclip import console

SPLIT = "test"  # the split `clip_benchmark eval` reads unless told otherwise
SHARD_SAMPLES = 10_000  # samples per tar shard at most: clip_benchmark's own writer's default
# clip_benchmark hands each of its data workers (--num_workers, 4 by default) whole shards, and webdataset stops a worker
# that gets none ("No samples found in dataset; perhaps you have fewer shards than workers"): a split is cut into at
# least this many shards while it has as many images.
MIN_SHARDS = 16
RETRIEVAL = "retrieval"


class ShardWriter:
    """FOLDER/test/{0,1,...}.tar of webdataset samples (files KEY.EXT, consecutive per key), then nshards.txt."""

    def __init__(self, folder: Path, total: int):
        self.folder = folder / SPLIT
        self.folder.mkdir(parents=True)
        self.per_shard = max(1, min(SHARD_SAMPLES, -(-total // MIN_SHARDS)))
        self.samples = 0
        self.tar: tarfile.TarFile | None = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self.samples % self.per_shard == 0:
            self.close_shard()
            self.tar = tarfile.open(self.folder / f"{self.samples // self.per_shard}.tar", "w")
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def close(self) -> None:
        self.close_shard()
        (self.folder / "nshards.txt").write_text(f"{-(-self.samples // self.per_shard)}\n")


def distinct_images(ds, label_columns: tuple[str, ...]) -> list[dict]:
    """Per distinct image of an MDS dataset, in index order: {"index" (its first record), "captions", "labels"}."""
    from kclip.retrieval.split import image_id

    images: dict[str, dict] = {}
    for index in range(ds.num_samples):
        record = ds.get_item(index)
        image = images.setdefault(image_id(record["id"]), {"index": index, "captions": [],
                                                            "labels": {c: record[c] for c in label_columns}})
        image["captions"].append(record["caption"])
    return list(images.values())


def png(ds, index: int) -> bytes:
    from kclip.data.transforms import decode_rgb

    record = ds.get_item(index)
    try:
        image = decode_rgb(record["image"])
    except Exception as e:  # noqa: BLE001 - PIL signals bad bytes with many exception types
        raise ValueError(f"record {index} ({record['id']}) does not decode ({type(e).__name__}: {e}); kclip prepare "
                         "checks every image, so this split was changed or written otherwise") from e
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_wds(data: str, out: Path, label_columns: tuple[str, ...], templates) -> dict:
    """Write the datasets the module docstring lists into `out` (created); returns their sizes."""
    from streaming import StreamingDataset

    from kclip import dist
    from kclip.eval.zeroshot import label_targets, readable

    if RETRIEVAL in label_columns:
        raise ValueError(f"--label-cols: a column named {RETRIEVAL!r} would overwrite the retrieval dataset")
    if not os.path.isfile(os.path.join(data, "index.json")):
        raise FileNotFoundError(f"--data: not an MDS folder (no index.json): {data}")
    dist.map_launcher_env()  # streaming reads the launcher's variables (one process here)
    ds = StreamingDataset(local=data, shuffle=False, batch_size=1)
    absent = [c for c in label_columns if c not in ds.shards[0].column_names]
    if absent:
        raise ValueError(f"--label-cols: {data} has no column(s) {absent}; columns are {ds.shards[0].column_names}")
    images = distinct_images(ds, label_columns)
    if not images:
        raise ValueError(f"--data: {data} holds no samples")
    (out / RETRIEVAL).mkdir(parents=True)
    (out / RETRIEVAL / "dataset_type.txt").write_text(f"{RETRIEVAL}\n")
    writers = {RETRIEVAL: ShardWriter(out / RETRIEVAL, len(images))}
    targets = {}
    for column in label_columns:
        classes, targets[column] = label_targets([image["labels"][column] for image in images])
        (out / column).mkdir()
        (out / column / "classnames.txt").write_text("".join(readable(c) + "\n" for c in classes))
        (out / column / "zeroshot_classification_templates.txt").write_text(
            "".join(t.replace("{}", "{c}") + "\n" for t in templates))
        writers[column] = ShardWriter(out / column, len(images))
    for i, image in enumerate(console.progress(len(images), "writing images", "image", iterable=images)):
        key, pixels = f"s{i:07d}", png(ds, image["index"])
        captions = "\n".join(" ".join(caption.splitlines()) for caption in image["captions"])
        writers[RETRIEVAL].write(key, {"png": pixels, "txt": captions.encode()})
        for column in label_columns:
            writers[column].write(key, {"png": pixels, "cls": str(int(targets[column][i])).encode()})
    for writer in writers.values():
        writer.close()
    sizes = {RETRIEVAL: {"images": len(images), "captions": sum(len(image["captions"]) for image in images)}}
    sizes.update({c: {"images": len(images), "classes": int(targets[c].max()) + 1} for c in label_columns})
    return sizes


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kclip export-wds", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MDS folder of image-caption pairs, as for kclip eval --data")
    p.add_argument("--out", required=True, help="output folder (absent or empty)")
    p.add_argument("--label-cols", type=console.comma_list, default=(), help="comma-separated label columns of --data: one "
                   "zero-shot classification dataset each, as kclip eval --label-cols")
    p.add_argument("--templates", help="file of zero-shot prompt templates, one per line with {} (default: kclip "
                   "eval's)")
    console.add_verbose_flag(p)
    args = console.parse_args(p, argv)
    # streaming and the evaluation code import torch: after parsing, so that --help and argument errors answer at once.
    from kclip.eval.protocol import DEFAULT_TEMPLATES
    from kclip.eval.zeroshot import load_templates

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"--out: {out} exists and is not empty")
        templates = load_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
        shutil.rmtree(tmp, ignore_errors=True)
        sizes = write_wds(args.data, tmp, args.label_cols, templates)
    except (OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"kclip export-wds: error: {e}", file=sys.stderr)
        return 2
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "split": SPLIT, "datasets": sizes}))
    return 0
