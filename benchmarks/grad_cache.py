"""Gradient accumulation with GradCache against one big batch and plain accumulation, at the same global batch, side
by side in one run: time per optimizer step and peak memory.

    PYTHONPATH=. python benchmarks/grad_cache.py                # -> benchmarks/results/grad_cache.json
    PYTHONPATH=. python benchmarks/grad_cache.py --config smoke --batch 32 --micro 8 --iters 4 --json /tmp/gc.json

Variants (one rank, the same initial student, rows and targets; their order rotates every iteration so that load
drifts on a shared machine hit all three alike):
    big batch    micro = batch: forward, loss, backward, step (`KnowledgeCLIPTask.step` with one micro-batch);
    GradCache    batch / micro micro-batches: forwards without grad, the loss over the whole batch, each micro-batch
                 again with grad (`KnowledgeCLIPTask.step`, kclip's accumulation);
    plain accum  batch / micro micro-batches, each with its own loss over the micro-batch (what kclip did before
                 GradCache, and open_clip without accum_freq): no extra forward, but every batch-level term shrinks
                 to the micro-batch. Written out here as the baseline; the trainer no longer has it.
All three loss terms run: teacher targets are random unit vectors of the teacher's width and the concept bank is
fitted on random rows (the student's cost does not depend on their values, and the teacher's cost, the same in every
variant, is not part of the comparison).

Peak memory per step: on CPU the rise of the peak RSS (VmHWM, reset before each step) over the RSS before it, in a
child process whose glibc returns every large freed block to the OS (a fixed mmap threshold), so that one variant's
freed activations do not hide in the next one's baseline; on CUDA torch.cuda.max_memory_allocated over the allocation
before the step. Target (issue 11): GradCache at most 1.4x the big batch's time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import (
    RESULTS,
    ROOT,
    machine,
    median,
    print_table,
    remove_shm_buffers,
    reset_peak_rss,
    rss_kib,
    write_json,
)

VARIANTS = ("big batch", "GradCache", "plain accum")
TARGET = 1.4
MIB = 2**20


def measure(args) -> dict:
    """Runs in the child: builds the three engines and times `args.iters` alternating steps after 2 warm-up rounds."""
    import torch
    import torch.nn.functional as F

    from kclip import dist
    from kclip.concepts.bank import ConceptBank
    from kclip.config import load_config
    from kclip.models.knowledge_clip import KnowledgeCLIP
    from kclip.tokenizers import student_tokenizer
    from kclip.train.engine import build_engine, seed_everything
    from kclip.train.task import KnowledgeCLIPTask

    torch.set_num_threads(args.threads)
    dist.init()
    device = dist.device()
    cuda = device.type == "cuda"
    tasks = {}
    for name in VARIANTS:
        micro = args.batch if name == "big batch" else args.micro
        cfg = load_config(args.config, [*args.overrides, f"train.global_batch_size={args.batch}",
                                        f"train.micro_batch_size={micro}"])
        seed_everything(cfg.train.seed)  # the same initial weights for every variant
        tok = student_tokenizer(cfg)
        model = KnowledgeCLIP(cfg, tok, args.teacher_dim)
        engine = build_engine(model, cfg)
        tasks[name] = KnowledgeCLIPTask(cfg, engine)

    b, s = args.batch, cfg.student
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (b, s.text_max_len), generator=gen)
    ids[:, -1] = tok.eos_token_id  # full-length captions: the text tower's worst case
    batch = {"pixels": torch.randn(b, 3, s.image_size, s.image_size, generator=gen), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    bank = ConceptBank(cfg.concepts.k, args.teacher_dim, niter=cfg.concepts.niter, seed=cfg.concepts.seed)
    bank.fit(F.normalize(torch.randn(max(b, 4 * cfg.concepts.k), args.teacher_dim, generator=gen), dim=1))
    teacher = F.normalize(torch.randn(b, args.teacher_dim, generator=gen), dim=1)
    targets = {"teacher_target": teacher.to(device), "soft_labels": bank.soft_labels(teacher, cfg.concepts.tau).to(device)}
    parts = [{k: v[i : i + args.micro] for k, v in batch.items()} for i in range(0, b, args.micro)]
    part_targets = [{k: v[i : i + args.micro] for k, v in targets.items()} for i in range(0, b, args.micro)]

    def plain_accumulation(task):
        for part, t in zip(parts, part_targets):
            total, _ = task.loss(task.forward(part), t)
            task.backward(total)
            task.optimizer_step()

    steps = {"big batch": lambda: tasks["big batch"].step([batch], targets),
             "GradCache": lambda: tasks["GradCache"].step(parts, targets),
             "plain accum": lambda: plain_accumulation(tasks["plain accum"])}
    seconds = {name: [] for name in VARIANTS}
    peak_mib = {name: [] for name in VARIANTS}
    for i in range(args.iters + 2):
        for name in VARIANTS[i % 3:] + VARIANTS[: i % 3]:
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                base = rss_kib("VmRSS") * 1024
                reset_peak_rss()
            start = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
            if i >= 2:  # two warm-up rounds: lazy initialisation, allocator growth
                seconds[name].append(elapsed)
                peak_mib[name].append((peak - base) / MIB)
    remove_shm_buffers(os.environ["MASTER_PORT"])
    return {"device": str(device), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in tasks["big batch"].engine.module.parameters()),
            "seconds": seconds, "peak_mib": peak_mib}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--batch", type=int, default=128, help="global batch (one rank)")
    p.add_argument("--micro", type=int, default=32, help="micro-batch of the accumulating variants")
    p.add_argument("--teacher-dim", type=int, default=576, help="teacher width (SmolLM2-135M: 576)")
    p.add_argument("--iters", type=int, default=6, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(RESULTS / "grad_cache.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. student.grad_checkpointing=true")
    args = p.parse_args(argv)
    if args.micro < 1 or args.batch % args.micro or args.batch == args.micro:
        p.error("--micro must divide --batch and be smaller")
    if args.child:
        print(json.dumps(measure(args)))
        return 0

    os.chdir(ROOT)
    info = machine()
    cmd = [sys.executable, __file__, "--child", *(argv if argv is not None else sys.argv[1:])]
    # A fixed mmap threshold makes glibc hand every large freed block back to the OS (see the docstring).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        print(out.stdout[-2000:] + out.stderr[-4000:], file=sys.stderr)
        return out.returncode
    result = json.loads(out.stdout.strip().splitlines()[-1])
    big = median(result["seconds"]["big batch"])
    rows = [[name, 1000 * median(result["seconds"][name]), median(result["seconds"][name]) / big,
             median(result["peak_mib"][name])] for name in VARIANTS]
    print(f"\n{args.config}, global batch {args.batch}, micro-batch {args.micro}, {result['device']}, "
          f"{result['threads']} thread(s), {args.iters} alternating steps per variant (medians)")
    print_table(["variant", "ms/step", "x big batch", "peak MiB"], rows, digits=2)
    ratio = rows[1][2]
    print(f"GradCache / big batch: {ratio:.2f}x (target <= {TARGET}x)")
    write_json(args.json, {
        "benchmark": "grad_cache", "machine": info, "config": args.config, "overrides": args.overrides,
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
        "total_s": round(time.perf_counter() - started, 1),
        "medians": {r[0]: {"ms_per_step": r[1], "x_big_batch": r[2], "peak_mib": r[3]} for r in rows},
        "gradcache_over_big": ratio, "target": TARGET, **result,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
