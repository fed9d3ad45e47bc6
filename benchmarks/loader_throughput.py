"""Loader throughput (samples/s) over the Twemoji demo data: decode + train transform + tokenisation, for several
DataLoader worker counts measured one after another in the same run.

    PYTHONPATH=. python benchmarks/loader_throughput.py   # -> benchmarks/results/loader_throughput.json

Startup (first batch, including worker start and shard decompression) is reported separately from the steady rate,
which is measured over `--batches` batches after `--warmup` batches. The measuring process runs torch with
`--torch-threads` (default 1, what DataLoader workers use): with several processes on few cores, OpenMP threads
spinning in the main process would otherwise dominate the workers=0 number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from kclip.data.demo import build_demo
from kclip.data.loader import build_loader


def measure(data: str, workers: int, args) -> dict:
    dl = build_loader(
        data, batch_size=args.batch_size, image_size=args.image_size, train=True, student_tokenizer="byte",
        student_max_len=77, teacher_tokenizer=args.teacher_tokenizer, num_workers=workers, seed=0,
    )
    start = time.perf_counter()
    first = None
    seen = 0
    timed_from = None
    while seen < args.warmup + args.batches:  # re-iterate (next epoch) if one epoch is too short
        for _ in dl:
            seen += 1
            now = time.perf_counter()
            if first is None:
                first = now - start
            if seen == args.warmup:
                timed_from = now
            if seen == args.warmup + args.batches:
                break
    elapsed = time.perf_counter() - timed_from
    return {
        "workers": workers,
        "samples_per_s": round(args.batches * args.batch_size / elapsed, 1),
        "first_batch_s": round(first, 2),
        "timed_batches": args.batches,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an MDS folder (default: build the demo into a temp folder and use its train split)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--teacher-tokenizer", default=None, help="also tokenise for a teacher (byte | PATH)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/loader_throughput.json")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            build_demo(os.path.join(tmp, "demo"), workers=2)
            data = os.path.join(tmp, "demo", "train")
        rows = [measure(data, w, args) for w in args.workers]

    print(f"{'workers':>7} {'samples/s':>10} {'first batch s':>14}")
    for r in rows:
        print(f"{r['workers']:>7} {r['samples_per_s']:>10} {r['first_batch_s']:>14}")
    result = {
        "benchmark": "loader_throughput",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "teacher_tokenizer": args.teacher_tokenizer,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
