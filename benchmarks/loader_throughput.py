"""CPU per batch of kclip's training loader against open_clip's CsvDataset, on the same images and captions.

    python -m venv --system-site-packages benchmarks/.venv                  # once (see vs_open_clip.py)
    benchmarks/.venv/bin/pip install open_clip_torch==3.3.0 ftfy pandas braceexpand webdataset
    benchmarks/.venv/bin/python benchmarks/loader_throughput.py   # -> benchmarks/results/loader_throughput.json

The demo train split is exported once to RGB PNG files and a TSV (filepath, title); open_clip's `CsvDataset` reads the
TSV with open_clip's own train transform and `HFTokenizer` (the same tokenizer as kclip's, saved for it), and kclip's
`build_loader` reads an MDS folder that `kclip prepare csv` made from the same TSV. Both apply the same recipe:
RandomResizedCrop (scale 0.9-1, bicubic), CLIP normalisation, captions tokenised to the student's context.

Both loaders run in this process (`num_workers=0`, one torch thread), so the process's CPU time while a batch is
produced is all the work a DataLoader worker would do for it: that CPU is what a GPU host's loader cores must supply.
Batches alternate between the two loaders (kclip, open_clip, kclip, ...), so load drifts on a shared machine hit both
alike; `--rounds` blocks of `--batches` batches each, the ratio kclip / open_clip is taken per round and its median
reported. Wall ms per batch is reported alongside.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    ROOT,
    bench_env,
    export_split,
    machine,
    median,
    print_table,
    run_logged,
    write_json,
)

TARGET = 1.0


def open_clip_loader(tsv: Path, tokenizer, context: int, image_size: int, batch_size: int, folder: Path):
    import torch
    from open_clip import image_transform
    from open_clip.tokenizer import HFTokenizer
    from open_clip_train.data import CsvDataset
    from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from torch.utils.data import DataLoader

    tokenizer.save_pretrained(folder)
    transform = image_transform(image_size, is_train=True, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    data = CsvDataset(str(tsv), transform, "filepath", "title", sep="\t",
                      tokenizer=HFTokenizer(str(folder), context_length=context))
    return DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def endless(loader):
    """Batches of `loader`, epoch after epoch."""
    while True:
        yield from loader


def timed_batch(batches) -> tuple[float, float]:
    """(CPU ms, wall ms) of this process to produce the next batch."""
    cpu, wall = time.process_time(), time.perf_counter()
    next(batches)
    return 1000 * (time.process_time() - cpu), 1000 * (time.perf_counter() - wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo/train", help="an MDS split to export (default: the demo's train split)")
    p.add_argument("--tokenizer", default="byte", help="the student tokenizer of both loaders (a load_tokenizer spec)")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64, help="the demo student's 64 px by default")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--captions", choices=("long", "natural"), default="natural")
    p.add_argument("--work", help="folder for the exported data (reused when present); default a temp folder")
    p.add_argument("--json", default=str(RESULTS / "loader_throughput.json"))
    args = p.parse_args()
    os.chdir(ROOT)
    try:
        import open_clip_train  # noqa: F401
        import pandas  # noqa: F401  (open_clip_train.data needs it)
    except ImportError as e:
        p.error(f"{e}: run this with the benchmark venv's python (see the docstring)")

    import torch

    from kclip.data.loader import build_loader
    from kclip.tokenizers import load_tokenizer

    torch.set_num_threads(1)
    info = machine()
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory(prefix="kclip-loader-") as tmp:
        work = Path(args.work or tmp)
        data = work / f"data_{args.captions}"
        tsv = export_split(args.data, data, args.context, args.captions)
        mds = data / "mds"
        if not (mds / "index.json").is_file():
            run_logged([sys.executable, "-m", "kclip.cli", "prepare", "csv", "--src", str(tsv), "--out", str(mds),
                        "--workers", "2"], data / "prepare.log", bench_env(1), 1200)
        loaders = {
            "kclip": endless(build_loader(
                str(mds), batch_size=args.batch_size, image_size=args.image_size, train=True,
                student_tokenizer=tokenizer, student_max_len=args.context, num_workers=0)),
            "open_clip": endless(open_clip_loader(tsv, tokenizer, args.context, args.image_size, args.batch_size,
                                                  work / "tokenizer")),
        }
        for batches in loaders.values():  # the first batch opens shards and files
            next(batches)
        rounds = []
        for r in range(args.rounds):
            times = {name: [] for name in loaders}
            for _ in range(args.batches):
                for name, batches in loaders.items():
                    times[name].append(timed_batch(batches))
            row = {name: {"cpu_ms": median(t[0] for t in ts), "wall_ms": median(t[1] for t in ts)}
                   for name, ts in times.items()}
            row["cpu_ratio"] = row["kclip"]["cpu_ms"] / row["open_clip"]["cpu_ms"]
            rounds.append(row)

    table = [[r, x["kclip"]["cpu_ms"], x["open_clip"]["cpu_ms"], x["cpu_ratio"], x["kclip"]["wall_ms"],
              x["open_clip"]["wall_ms"]] for r, x in enumerate(rounds)]
    ratio = median(x["cpu_ratio"] for x in rounds)
    print(f"\nms per batch of {args.batch_size} (median of {args.batches} per round; {args.image_size} px, "
          f"{args.tokenizer} tokenizer, context {args.context}, {args.captions} captions, 1 thread, workers=0)")
    print_table(["round", "kclip CPU", "open_clip CPU", "kclip/open_clip", "kclip wall", "open_clip wall"], table,
                digits=2)
    print(f"median CPU ratio over rounds {ratio:.3f} (target <= {TARGET})")
    write_json(args.json, {"benchmark": "loader_throughput", "machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("work", "json")}, "rounds": rounds,
                           "median_cpu_ratio": ratio, "target": TARGET})


if __name__ == "__main__":
    main()
