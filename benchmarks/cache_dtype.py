"""What a half-size teacher cache (`teacher.cache_dtype` bf16 or fp16) does to the distillation targets.

The real small teacher (SmolLM2-135M, 576 wide, the demo config's teacher settings) embeds captions of the demo's
training split once in float32; each dtype then stores and reads them back through the cache's own encoding
(`encode_rows`, `decode_rows`). Reported per dtype, in float64:
    cosine error     1 - cos(row, row read back): max and mean, of the raw rows (distill_target=raw) and of the
                     centred ones (distill_target=centered: each set minus its own mean; the rows share one dominant
                     direction, so what is left after centring is short and the same rounding is a larger part of it)
    norm error       max |norm^2 - 1| of the rows read back: what the cache's damage check must allow (norm_tolerance),
                     and the share of rows that float32's tolerance (1e-3) would have taken for damaged
and the same on random unit vectors of the teacher's width. Plus the cache size for CC3M with a 4096-wide teacher.

    python benchmarks/cache_dtype.py   # -> benchmarks/results/cache_dtype.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import DEMO_TEACHER, ROOT, machine, write_json

# CC3M's training pairs (~3.0 M downloadable) x Llama-2-7B's width: the production cache
CC3M_SAMPLES, WIDE_TEACHER = 3_000_000, 4096


def errors(rows: torch.Tensor, dtype: str) -> dict:
    """Cosine and norm errors of `rows` [N, D] (float32, unit norm) once stored in `dtype` and read back."""
    from kclip.teacher.cache import decode_rows, encode_rows, norm_tolerance

    read = torch.from_numpy(decode_rows(encode_rows(rows, dtype), dtype)).double()
    rows = rows.double()
    raw = 1 - F.cosine_similarity(rows, read, dim=1)
    centred = 1 - F.cosine_similarity(rows - rows.mean(0), read - read.mean(0), dim=1)
    norm_error = (read.pow(2).sum(1) - 1).abs()
    return {"max_cos_error": float(raw.max()), "mean_cos_error": float(raw.mean()),
            "max_cos_error_centred": float(centred.max()), "mean_cos_error_centred": float(centred.mean()),
            "max_norm_sq_error": float(norm_error.max()), "norm_tolerance": norm_tolerance(dtype),
            "share_beyond_fp32_tolerance": float((norm_error >= norm_tolerance("fp32")).double().mean())}


def run(args) -> dict:
    from kclip.config import load_config
    from kclip.eval.concept_map import sample_captions
    from kclip.teacher.cache import STORAGE
    from kclip.teacher.load import build_teacher

    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(load_config("demo").teacher, path=args.teacher)
    teacher = build_teacher(cfg, shard=False)
    captions = sample_captions(args.data, args.captions)
    start = time.perf_counter()
    with torch.no_grad():
        emb = teacher.embed(*teacher.tokenize(captions)).float()
    embed_s = time.perf_counter() - start
    unit = F.normalize(torch.randn(args.random, teacher.hidden_size, generator=torch.Generator().manual_seed(0)), dim=1)
    dtypes = [d for d in STORAGE if d != "fp32"]
    return {
        "machine": machine(), "teacher": Path(args.teacher).name, "hidden_size": teacher.hidden_size,
        "captions": len(captions), "data": os.path.relpath(args.data, ROOT), "embed_seconds": round(embed_s, 1),
        "cos_to_mean": float(F.cosine_similarity(emb, emb.mean(0, keepdim=True)).mean()),
        "teacher_rows": {d: errors(emb, d) for d in dtypes},
        "random_unit_rows": {d: errors(unit, d) for d in dtypes},
        "cc3m_cache_gb": {d: CC3M_SAMPLES * WIDE_TEACHER * np.dtype(STORAGE[d][1]).itemsize / 1e9 for d in STORAGE},
    }


def table(result: dict) -> str:
    lines = [("| rows | dtype | max cos error | mean cos error | max cos error, centred | max abs(norm^2 - 1) | "
              "norm tolerance | beyond 1e-3 |"), "|---|---|--:|--:|--:|--:|--:|--:|"]
    for rows in ("teacher_rows", "random_unit_rows"):
        for dtype, e in result[rows].items():
            lines.append(f"| {rows} | {dtype} | {e['max_cos_error']:.2e} | {e['mean_cos_error']:.2e} | "
                         f"{e['max_cos_error_centred']:.2e} | {e['max_norm_sq_error']:.2e} | "
                         f"{e['norm_tolerance']:.2e} | {e['share_beyond_fp32_tolerance']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=DEMO_TEACHER, help="GGUF file or HF folder (default: %(default)s)")
    parser.add_argument("--data", default=str(ROOT / "data" / "demo" / "train"))
    parser.add_argument("--captions", type=int, default=512, help="evenly spaced over the split")
    parser.add_argument("--random", type=int, default=4096, help="random unit vectors of the teacher's width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache_dtype.json"))
    args = parser.parse_args(argv)
    if not os.path.exists(args.teacher):
        print(f"skipped: teacher not found at {args.teacher} (run `kclip fetch-teacher` or set KCLIP_TEACHER)")
        return 0
    result = run(args)
    print(f"{result['teacher']} ({result['hidden_size']} wide), {result['captions']} captions of {result['data']}, "
          f"mean cosine to their mean {result['cos_to_mean']:.3f}")
    print(table(result))
    sizes = ", ".join(f"{d} {gb:.1f} GB" for d, gb in result["cc3m_cache_gb"].items())
    print(f"CC3M cache, 4096-wide teacher: {sizes}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
