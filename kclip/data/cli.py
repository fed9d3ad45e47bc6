"""`kclip prepare {csv,folder,tar,demo} ...`: convert image-caption data to MDS folders for training."""
from __future__ import annotations

import argparse
import json
import os
import sys

from kclip import console
from kclip.data.demo import build_demo
from kclip.data.prepare import DEFAULT_MAX_PIXELS, check_output_dir, write_mds
from kclip.data.sources import (
    count_folder_records,
    count_tar_records,
    csv_candidates,
    folder_candidates,
    tar_candidates,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kclip prepare", description=__doc__)
    sub = p.add_subparsers(dest="format", required=True)

    def common(sp, labels: bool = True):
        sp.add_argument("--out", required=True, help="output folder (must be empty or absent)")
        sp.add_argument("--tokenizer", default="byte", help="tokenizer for the caption length stats: byte | PATH")
        sp.add_argument("--workers", type=_positive_int, default=min(8, os.cpu_count() or 1), help="decode-check processes")
        if labels:
            sp.add_argument("--label-cols", type=console.comma_list, default=(), help="comma-separated label columns/keys")
            sp.add_argument("--shard-mb", type=_positive_int, default=64, help="uncompressed shard size limit in MB")
            sp.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                            help="skip images with more pixels (width x height, read before decoding) as "
                                 "too_many_pixels (default: %(default)s); above ~179 Mpx Pillow's own limit applies")
        console.add_verbose_flag(sp)

    c = sub.add_parser("csv", help="CSV/TSV with image path and caption columns")
    c.add_argument("--src", required=True)
    c.add_argument("--image-col", default="filepath")
    c.add_argument("--caption-col", default="title")
    c.add_argument("--sep", default="auto", help="auto | , | \\t")
    common(c)
    f = sub.add_parser("folder", help="x.jpg/png + x.txt caption (+ x.json metadata for labels)")
    f.add_argument("--src", required=True)
    common(f)
    t = sub.add_parser("tar", help="webdataset tars as img2dataset writes them (key.jpg + key.txt + key.json)")
    t.add_argument("--src", required=True, nargs="+", help="tar files and/or globs (quote globs)")
    common(t)
    d = sub.add_parser("demo", help="the Twemoji demo dataset (train/val, labels category/subcategory)")
    common(d, labels=False)
    return p


def prepare_main(argv: list[str]) -> int:
    args = console.parse_args(_parser(), argv)
    try:
        with console.beside(args.out):
            stats = _convert(args)
    except (OSError, ValueError) as e:
        print(f"kclip prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kclip prepare: interrupted; nothing written to {args.out}", file=sys.stderr)
        return console.interrupted()
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def _convert(args) -> dict:
    if args.format == "demo":
        return build_demo(args.out, tokenizer=args.tokenizer, workers=args.workers)
    # Counted first (no image is read) so that the progress bar has an ETA; a bad --out fails before that.
    check_output_dir(args.out)
    if args.format == "csv":
        columns = {"image_col": args.image_col, "caption_col": args.caption_col,
                   "label_cols": args.label_cols, "sep": args.sep}
        candidates = csv_candidates(args.src, **columns)
        total = sum(1 for _ in csv_candidates(args.src, **columns))  # the rows alone: one pass over the CSV
    elif args.format == "folder":
        candidates = folder_candidates(args.src, label_cols=args.label_cols)
        total = count_folder_records(args.src)
    else:
        candidates = tar_candidates(args.src, label_cols=args.label_cols)
        total = count_tar_records(args.src)
    return write_mds(
        candidates, args.out, label_columns=args.label_cols, tokenizer=args.tokenizer, workers=args.workers,
        size_limit=args.shard_mb << 20, max_pixels=args.max_pixels, desc=f"prepare {args.format}", total=total,
    )
