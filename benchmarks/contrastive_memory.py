"""Peak memory and time of one rank's contrastive loss (forward + backward) against the global batch.

One process simulates rank 0 of a `--world`-rank job: the gathered [N, E] image and text embeddings are leaf tensors
and rank 0's rows are their first b = N / world rows, fed to `kclip.losses.symmetric_infonce` exactly as
`contrastive_loss` does after its all-gather. Variants:
    full          every rank builds the global [N, N] logits
    local         b x N logits (open_clip's local_loss)
    full+chunk    the full loss over [chunk, chunk] tiles
    local+chunk   the local loss over [chunk, chunk] tiles

Each measurement runs in a fresh subprocess. On CPU the peak is the rise of the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs) over the RSS after the inputs exist and a warm-up pass; it includes the two [N, E]
input gradients (2 * N * E * 4 bytes).
On CUDA it is torch.cuda.max_memory_allocated over the allocation before the loss. `logits MiB` is the analytic size
of the largest logits block one rank holds (fp32).

    python benchmarks/contrastive_memory.py --out benchmarks/results/contrastive_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import reset_peak_rss, rss_kib

MODES = {"full": (False, False), "local": (True, False), "full+chunk": (False, True), "local+chunk": (True, True)}
MIB = 2**20


def _measure(mode: str, n: int, world: int, dim: int, chunk: int, repeats: int, device: str) -> dict:
    """Runs inside the subprocess: a warm-up pass, a pass measured for memory, then `repeats` timed passes."""
    import torch
    import torch.nn.functional as F

    from kclip.losses import symmetric_infonce

    local, chunked = MODES[mode]
    b = n // world
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device).requires_grad_()
    text = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)

    def step():
        rows = (image[:b], text[:b]) if local else (image, text)
        loss = symmetric_infonce(*rows, image, text, scale, chunk_size=chunk if chunked else 0)
        loss.backward()
        image.grad = text.grad = scale.grad = None
        return loss

    step()  # warm-up: lazy initialisation (thread pools, allocator arenas) must not count as the loss's memory
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_kib("VmRSS")
        reset_peak_rss()
        step()
        peak = (rss_kib("VmHWM") - base) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    rows = b if local else n
    logits_block = min(rows, chunk) * min(n, chunk) if chunked else rows * n
    return {
        "mode": mode, "global_batch": n, "world": world, "local_batch": b, "dim": dim,
        "chunk": chunk if chunked else 0, "device": device, "threads": torch.get_num_threads(),
        "logits_mib": logits_block * 4 / MIB, "peak_mib": peak / MIB, "seconds": min(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="global batch N")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--world", type=int, default=8, help="simulated ranks (local batch = N / world)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the fastest is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results/contrastive_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        n = args.batches[0]
        print(json.dumps(_measure(args.mode, n, args.world, args.dim, args.chunk, args.repeats, args.device)))
        return

    results = []
    header = f"{'mode':<12} {'N':>6} {'b':>5} {'logits MiB':>11} {'peak MiB':>9} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for n in args.batches:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--batches", str(n), "--world", str(args.world),
                   "--dim", str(args.dim), "--chunk", str(args.chunk), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--device", args.device]
            # A fixed mmap threshold makes glibc hand every large freed block back to the OS, so the RSS after the
            # warm-up holds none of its tensors and the peak RSS rise is the measured pass's own.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{mode:<12} {n:>6} {row['local_batch']:>5} {row['logits_mib']:>11.1f} {row['peak_mib']:>9.1f} "
                  f"{row['seconds']:>8.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("child", "mode")}, "results": results},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
