"""Teacher throughput: captions padded to the batch's longest vs length-bucketed vs packed, on the real small teacher.

Captions are the demo dataset's (Twemoji names through the caption templates of `kclip.data.demo`; ~12 teacher tokens
on average, max ~26, a CC3M-like short-caption distribution), shuffled with a fixed seed, in batches of `--batch`.
One teacher (single process, unsharded) runs four ways, interleaved batch by batch so load drifts on a shared
machine hit all of them alike:
    padded     one forward per batch, every caption padded to the batch's longest (chunk = batch, no bucketing)
    chunked    chunks of `--chunk` captions in arrival order, each trimmed to its own longest caption
    bucketed   captions sorted by length, then chunks of `--chunk`, each trimmed (`packing: false`)
    packed     captions laid end to end in rows of max_len tokens, `--chunk` rows per forward (the default)
Reported: captions/s, real (non-pad) tokens/s, computed tokens per real token, speed-up over `padded`, and the
largest embedding difference to `padded` (the modes must agree). Skips with a message when the teacher file is
missing.

    python benchmarks/teacher_throughput.py   # -> benchmarks/results/teacher_throughput.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from pathlib import Path

import torch
from common import DEMO_TEACHER, ROOT, cpu_model, write_json


def demo_captions(n: int, seed: int = 0) -> list[str]:
    from kclip.data.demo import _metadata, caption

    captions = [caption(key, info) for key, info in sorted(_metadata().items())]
    random.Random(seed).shuffle(captions)
    return [captions[i % len(captions)] for i in range(n)]


def modes(batch: int, chunk: int) -> dict[str, dict]:
    return {
        "padded": dict(chunk_size=batch, bucket_by_length=False, packing=False),
        "chunked": dict(chunk_size=chunk, bucket_by_length=False, packing=False),
        "bucketed": dict(chunk_size=chunk, bucket_by_length=True, packing=False),
        "packed": dict(chunk_size=chunk, packing=True),
    }


def run(args) -> dict:
    from kclip.config import TeacherConfig
    from kclip.teacher.load import build_teacher

    torch.set_num_threads(args.threads)
    base = TeacherConfig(path=args.teacher, max_len=77)
    t0 = time.perf_counter()
    teacher = build_teacher(base, shard=False)
    load_s = time.perf_counter() - t0
    batches = [teacher.tokenize(demo_captions(args.batch * args.batches)[i * args.batch : (i + 1) * args.batch])
               for i in range(args.batches)]
    settings = modes(args.batch, args.chunk)
    stats = {name: {"seconds": 0.0, "captions": 0, "real_tokens": 0, "computed_tokens": 0, "forwards": 0,
                    "max_abs_diff": 0.0}
             for name in settings}
    teacher.cfg = dataclasses.replace(base, **settings["packed"])
    teacher.embed(*teacher.tokenize(demo_captions(8)))  # warm-up: first-call allocations, kernel selection
    for ids, mask in batches:
        reference = None
        for name, overrides in settings.items():
            teacher.cfg = dataclasses.replace(base, **overrides)  # same loaded weights, different chunking
            teacher.packing = teacher.cfg.packing
            before, forwards_before = teacher.tokens_processed, teacher.forwards
            start = time.perf_counter()
            emb = teacher.embed(ids, mask)
            if emb.is_cuda:
                torch.cuda.synchronize()
            s = stats[name]
            s["seconds"] += time.perf_counter() - start
            s["captions"] += ids.shape[0]
            s["real_tokens"] += int(mask.sum())
            s["computed_tokens"] += teacher.tokens_processed - before
            s["forwards"] += teacher.forwards - forwards_before
            reference = emb if reference is None else reference
            s["max_abs_diff"] = max(s["max_abs_diff"], float((emb - reference).abs().max()))
    for s in stats.values():
        s.update(captions_per_s=s["captions"] / s["seconds"], real_tokens_per_s=s["real_tokens"] / s["seconds"],
                 computed_per_real=s["computed_tokens"] / s["real_tokens"],
                 speedup_vs_padded=stats["padded"]["seconds"] / s["seconds"])
    lengths = torch.cat([m.sum(1) for _, m in batches]).float()
    return dict(
        teacher=Path(args.teacher).name, hidden_size=teacher.hidden_size, batch=args.batch, chunk=args.chunk,
        batches=args.batches, device=str(teacher.device), dtype=str(next(teacher.module.parameters()).dtype),
        threads=args.threads, cpu=cpu_model(), torch=torch.__version__,
        load_seconds=load_s, mean_tokens=float(lengths.mean()), max_tokens=int(lengths.max()), modes=stats,
    )


def table(result: dict) -> str:
    lines = ["| mode     | chunk | forwards | captions/s | real tokens/s | computed/real | vs padded | max abs diff |",
             "|----------|------:|---------:|-----------:|--------------:|--------------:|----------:|-------------:|"]
    for name, s in result["modes"].items():
        chunk = result["batch"] if name == "padded" else result["chunk"]
        lines.append(f"| {name:<8} | {chunk:>5} | {s['forwards']:>8} | {s['captions_per_s']:>10.1f} | "
                     f"{s['real_tokens_per_s']:>13.0f} | {s['computed_per_real']:>13.2f} | "
                     f"{s['speedup_vs_padded']:>8.2f}x | {s['max_abs_diff']:>12.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=DEMO_TEACHER, help="GGUF file or HF folder (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16, help="captions (rows, packed) per forward; the demo's value")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_throughput.json"))
    args = parser.parse_args(argv)
    if not os.path.exists(args.teacher):
        print(f"skipped: teacher not found at {args.teacher} (run `kclip fetch-teacher` or set KCLIP_TEACHER)")
        return 0
    result = run(args)
    print(f"{result['teacher']} on {result['device']} ({result['dtype']}, {result['threads']} threads), "
          f"batch {result['batch']}, {result['batches']} batches, mean {result['mean_tokens']:.1f} tokens/caption, "
          f"max {result['max_tokens']}")
    print(table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
