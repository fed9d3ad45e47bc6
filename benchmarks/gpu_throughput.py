"""One-GPU throughput of the paper-scale pair: a random-initialised Llama-2-7B-shaped teacher (bf16) and a ViT-B/16
CLIP student (kclip's student defaults), trained with all three Knowledge-CLIP losses.

    python benchmarks/gpu_throughput.py                 # needs a CUDA GPU; -> benchmarks/results/gpu_throughput.json
    python benchmarks/gpu_throughput.py --dry-run       # tiny teacher and student on the CPU: checks the code path

Per step (batch `--batch`, every caption cold, i.e. no teacher cache):
    teacher   `Teacher.embed` of `--batch` captions (chunks of `--chunk`, length-bucketed);
    student   forward + the three losses, DeepSpeed backward and step (bf16, ZeRO-1, one rank).
Each phase is timed with CUDA synchronisation. Inputs are synthetic and on the GPU already (no data loading): pixels
are random, caption token ids random with lengths drawn around `--mean-tokens` (CC3M captions average ~15 Llama
tokens; `--mean-tokens 77` gives every caption the full context), the student's text is `text_max_len` tokens.

Reported: samples/s for a cold step (teacher + student) and a warm-cache step (student only), teacher tokens/s (real
and computed, i.e. including padding inside chunks), and model FLOPs utilisation against `--peak-tflops` (dense bf16
of the device; looked up for A100/H100/H200):
    teacher FLOPs = 2 x teacher params x computed tokens                      (forward only)
    student FLOPs = 6 x (image-tower params x image tokens + rest x text tokens) per sample  (forward + backward)
Attention's quadratic term is left out of both (a few % at these lengths), so the MFU is a slight underestimate.
The run stops measuring after `--time-budget` seconds so that the whole script fits in ten minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import RESULTS, machine, median, print_table, remove_shm_buffers, write_json

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY_TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 384, "max_position_embeddings": 128}
TINY_STUDENT = {"image_model": "vit_tiny_patch16_224",
                "image_model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
                "image_size": 32, "text_width": 32, "text_layers": 2, "text_heads": 2, "text_max_len": 48,
                "embed_dim": 32}
CONCEPTS_K = 100  # kclip's default concepts.k (the paper's K)
# Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny teacher and student on the CPU, 2 steps")
    p.add_argument("--batch", type=int, default=256, help="samples per step (one GPU)")
    p.add_argument("--chunk", type=int, default=256, help="teacher.chunk_size: captions per teacher forward")
    p.add_argument("--mean-tokens", type=float, default=15.0, help="mean teacher caption length in tokens")
    p.add_argument("--max-len", type=int, default=77, help="teacher.max_len")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--time-budget", type=float, default=420.0, help="stop timing after this many seconds in total")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (default: by GPU name)")
    p.add_argument("--json", default=None, help="default benchmarks/results/gpu_throughput.json (none on --dry-run)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch, args.chunk, args.steps, args.warmup, args.max_len = 8, 4, 2, 1, 16
        args.mean_tokens = min(args.mean_tokens, 8.0)
    elif args.json is None:
        args.json = str(RESULTS / "gpu_throughput.json")
    if min(args.batch, args.chunk, args.steps, args.max_len) < 1 or args.warmup < 0 or args.mean_tokens < 1:
        p.error("--batch, --chunk, --steps, --max-len and --mean-tokens must be >= 1, --warmup >= 0")
    if args.batch < CONCEPTS_K and not args.dry_run:
        p.error(f"--batch must be >= {CONCEPTS_K}: the concept bank is fitted on the first step's captions")
    return args


def build_config(args):
    """The kclip Config of the measured pair: student defaults (ViT-B/16) or the tiny student for --dry-run."""
    from kclip.config import Config, TeacherConfig

    cfg = Config()
    cfg.teacher = TeacherConfig(random_config=TINY_TEACHER if args.dry_run else LLAMA2_7B,
                                dtype="fp32" if args.dry_run else "bf16", max_len=args.max_len, chunk_size=args.chunk,
                                cache=False)
    if args.dry_run:
        for key, value in TINY_STUDENT.items():
            setattr(cfg.student, key, value)
        cfg.concepts.k = 4
        cfg.train.precision = "fp32"
    cfg.train.global_batch_size = args.batch
    return cfg


def caption_batch(batch: int, mean_tokens: float, max_len: int, vocab: int, gen):
    """Random right-padded token ids [batch, max_len] with Poisson lengths around `mean_tokens` (at least 2)."""
    import torch

    lengths = torch.poisson(torch.full((batch,), float(mean_tokens)), generator=gen).long().clamp(2, max_len)
    ids = torch.randint(3, vocab, (batch, max_len), generator=gen)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def student_flops_per_sample(model, cfg) -> tuple[float, dict]:
    """6 x (image-tower params x image tokens + other params x text tokens): the training FLOPs of one sample."""
    visual = sum(p.numel() for p in model.student.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    image_tokens = (cfg.student.image_size // model.student.visual.patch_embed.patch_size[0]) ** 2 + 1
    text_tokens = cfg.student.text_max_len
    flops = 6.0 * (visual * image_tokens + (total - visual) * text_tokens)
    return flops, {"params": total, "image_tower_params": visual, "image_tokens": image_tokens,
                   "text_tokens": text_tokens}


def run(args) -> dict:
    import torch

    from kclip import dist
    from kclip.concepts.bank import ConceptBank
    from kclip.models.knowledge_clip import KnowledgeCLIP
    from kclip.teacher.load import build_teacher
    from kclip.tokenizers import student_tokenizer
    from kclip.train.engine import build_engine
    from kclip.train.task import KnowledgeCLIPTask

    started = time.perf_counter()
    cfg = build_config(args)
    dist.init()
    device = dist.device()
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    # Built directly on the device: initialising 6.7B random fp32 weights on the host first would take minutes.
    with torch.device(device):
        teacher = build_teacher(cfg.teacher)
    sync()
    teacher_load_s = time.perf_counter() - t0
    teacher_params = sum(p.numel() for p in teacher.module.parameters())
    tokenizer = student_tokenizer(cfg)
    model = KnowledgeCLIP(cfg, tokenizer, teacher.hidden_size)
    engine = build_engine(model, cfg)
    student_flops, student_info = student_flops_per_sample(model, cfg)
    param_dtype = next(engine.module.parameters()).dtype
    # The trainer's step glue; the teacher is timed here on its own, so the task gets its targets from this loop.
    task = KnowledgeCLIPTask(cfg, engine)
    gen = torch.Generator().manual_seed(0)
    vocab = teacher.module.config.vocab_size
    s = cfg.student
    # float32, as the loader delivers them (the model casts them to its weights' dtype)
    pixels = torch.randn(args.batch, 3, s.image_size, s.image_size, generator=gen).to(device)
    text_ids = torch.randint(3, len(tokenizer), (args.batch, s.text_max_len), generator=gen).to(device)
    text_mask = torch.ones_like(text_ids)
    batch = {"pixels": pixels, "input_ids": text_ids, "attention_mask": text_mask}
    captions = [caption_batch(args.batch, args.mean_tokens, args.max_len, vocab, gen)
                for _ in range(args.warmup + args.steps)]

    bank = ConceptBank(cfg.concepts.k, teacher.hidden_size, niter=cfg.concepts.niter, seed=cfg.concepts.seed)
    timings = []
    for i, (ids, mask) in enumerate(captions):
        if i >= args.warmup and time.perf_counter() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s reached after {len(timings)} timed steps", flush=True)
            break
        tokens_before = teacher.tokens_processed
        sync()
        a = time.perf_counter()
        teacher_emb = teacher.embed(ids, mask)
        sync()
        b = time.perf_counter()
        if not bank.fitted:
            bank.fit(teacher_emb)  # once, on the first step's embeddings: only the soft labels' shape matters here
        soft = bank.soft_labels(teacher_emb, cfg.concepts.tau)
        sync()
        c = time.perf_counter()
        total, _ = task.loss(task.forward(batch), {"teacher_target": teacher_emb, "soft_labels": soft})
        task.backward(total)
        task.optimizer_step()
        sync()
        d = time.perf_counter()
        if i >= args.warmup:
            timings.append({"teacher_s": b - a, "student_s": d - c, "computed_tokens": teacher.tokens_processed - tokens_before,
                            "real_tokens": int(mask.sum())})
    if not timings:
        raise SystemExit("no step was timed: raise --time-budget")

    teacher_s = median(t["teacher_s"] for t in timings)
    student_s = median(t["student_s"] for t in timings)
    computed = median(t["computed_tokens"] for t in timings)
    real = median(t["real_tokens"] for t in timings)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    teacher_flops = 2.0 * teacher_params * computed
    step_flops = teacher_flops + student_flops * args.batch

    def mfu(flops: float, seconds: float) -> float | None:
        return flops / seconds / (peak * 1e12) if peak else None

    remove_shm_buffers(os.environ["MASTER_PORT"])
    return {
        "device": name, "peak_tflops": peak, "dry_run": args.dry_run, "batch": args.batch, "chunk": args.chunk,
        "mean_tokens": args.mean_tokens, "max_len": args.max_len, "timed_steps": len(timings),
        "teacher": {"params": teacher_params, "hidden": teacher.hidden_size, "dtype": str(next(teacher.module.parameters()).dtype),
                    "load_s": teacher_load_s, "median_s": teacher_s, "real_tokens_per_step": real,
                    "computed_tokens_per_step": computed, "real_tokens_per_s": real / teacher_s,
                    "computed_tokens_per_s": computed / teacher_s, "mfu": mfu(teacher_flops, teacher_s)},
        "student": {**student_info, "dtype": str(param_dtype), "flops_per_sample": student_flops, "median_s": student_s,
                    "samples_per_s": args.batch / student_s, "mfu": mfu(student_flops * args.batch, student_s)},
        "cold_step": {"seconds": teacher_s + student_s, "samples_per_s": args.batch / (teacher_s + student_s),
                      "mfu": mfu(step_flops, teacher_s + student_s)},
        "warm_step_samples_per_s": args.batch / student_s,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "total_s": time.perf_counter() - started,
        "steps": timings,
    }


def report(result: dict) -> None:
    t, s, c = result["teacher"], result["student"], result["cold_step"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    print(f"\n{result['device']}: teacher {t['params'] / 1e9:.2f}B params ({t['dtype']}), student "
          f"{s['params'] / 1e6:.1f}M params ({s['dtype']}), batch {result['batch']}, {result['timed_steps']} timed steps")
    print_table(["phase", "s/step", "samples/s", "tokens/s (real / computed)", "MFU"], [
        ["teacher forward", t["median_s"], result["batch"] / t["median_s"],
         f"{t['real_tokens_per_s']:.0f} / {t['computed_tokens_per_s']:.0f}", pct(t["mfu"])],
        ["student fwd+bwd+step", s["median_s"], s["samples_per_s"], "", pct(s["mfu"])],
        ["cold step (both)", c["seconds"], c["samples_per_s"], "", pct(c["mfu"])],
    ], digits=3)
    if result["max_memory_gib"] is not None:
        print(f"peak GPU memory {result['max_memory_gib']:.1f} GiB; teacher built in {t['load_s']:.0f} s; "
              f"total {result['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU is visible; this benchmark needs one "
              "(use --dry-run for a CPU check of the code path)", file=sys.stderr)
        return 2
    info = machine()
    result = run(args)
    report(result)
    if args.json:
        write_json(args.json, {"benchmark": "gpu_throughput", "machine": info,
                               "args": {k: v for k, v in vars(args).items() if k != "json"}, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
