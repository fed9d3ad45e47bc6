"""Step time of kclip's trainer (plain-CLIP mode) against open_clip's own trainer on the same student, data and steps.

    python -m venv --system-site-packages benchmarks/.venv                  # once; torch comes from the system
    benchmarks/.venv/bin/pip install open_clip_torch==3.3.0 ftfy pandas braceexpand webdataset  # ships open_clip_train
    PYTHONPATH=. python benchmarks/vs_open_clip.py    # -> benchmarks/results/vs_open_clip.json

The student is the one of `--config` (demo: timm ViT patch 8, depth 4, width 128, 4 heads at 64 px; text transformer
width 128, 3 layers, 4 heads, context 64; embedding 128; byte tokenizer):
- kclip: `kclip train --config demo loss.distill_weight=0 loss.concept_weight=0` (no teacher), one process.
- open_clip: `open_clip_train.main` from PyPI, one process, `--model local-dir:FOLDER`: the same student, freshly
  initialised, written by `kclip export --format open_clip`'s writer (kclip/export/open_clip.py): the same timm model
  with the same kwargs (timm's own `local-dir:` config, because open_clip passes no architecture kwargs to timm), a text
  tower of the same width, layers, heads, context, vocabulary (the byte tokenizer, in the folder for open_clip's
  HFTokenizer) and activation (quick GELU, the default of the HF CLIP text model kclip uses), EOS pooling.
  open_clip_train starts from the folder's (random) weights.
Both train fp32 with AdamW (betas 0.9/0.98, eps 1e-6, weight decay, no decay on gains/biases), cosine schedule with
warm-up, gradient clipping 1.0, the same global batch, `--workers` data workers, `--threads` OpenMP threads.

Data: the demo train split exported once to RGB PNG files and a TSV (filepath, title); open_clip reads the TSV
(`--dataset-type csv`), kclip reads an MDS folder made from the same TSV by `kclip prepare csv`. Captions: with
`--captions long` (default) each caption is repeated until it fills the context, so both trainers run the text tower
on exactly `text_max_len` tokens (open_clip always pads to the context, kclip pads to the batch's longest caption);
`--captions natural` keeps the demo captions, which gives kclip's shorter padding an advantage.

Timing: one epoch each (`--steps`, default the whole split), runs alternating kclip, kclip with glibc's malloc
defaults (`train.keep_freed_memory=false`: open_clip_train makes no allocator setting), open_clip, open_clip with
kclip's allocator setting, kclip, ... for `--rounds` rounds. Step time = wall time from the end of one step to the end of the next, logging included, startup
excluded: kclip's `time` of consecutive metrics.jsonl rows (log.every=1), open_clip's `Batch (t)` with
--log-every-n-steps 1 (its timer restarts before the log line is written, so the logging lands in the next step's
time, as in kclip). The first `--skip` steps of each run are left out. Reported: median per run, the ratio
kclip/open_clip per round and its median over rounds, and each trainer's median data wait.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (
    PLAIN_CLIP,
    RESULTS,
    ROOT,
    bench_env,
    export_split,
    kclip_train_cmd,
    machine,
    median,
    print_table,
    read_rows,
    remove_shm_buffers,
    run_kclip,
    run_logged,
    wall_ms_per_step,
    write_json,
)

TARGET = 0.95  # median step-time ratio kclip / open_clip
WHOLE_RUN_TARGET = 1.0  # median ratio of whole runs (process start to exit)
# Plain CLIP (no teacher) with the byte tokenizer the results were measured with: the demo config's own, the teacher's
# (SmolLM2), puts no end-of-text token at a caption's end, where open_clip's text tower pools.
PLAIN = [*PLAIN_CLIP, "student.tokenizer=byte"]
# Each trainer as shipped, and each with the other's CPU allocator setting (kclip/train/memory.py; open_clip_train makes
# none): the targets compare the first two; the other two show how much of the difference is the allocator rather than
# the trainers' code.
KCLIP_VARIANTS = {"kclip": [], "kclip_glibc_defaults": ["train.keep_freed_memory=false"]}
OPEN_CLIP_VARIANTS = {"open_clip": [], "open_clip_kept_memory": ["--keep-freed-memory"]}
OPEN_CLIP_STEP = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)")
DEFAULT_VENV_PYTHON = ROOT / "benchmarks" / ".venv" / "bin" / "python"


# ---------------------------------------------------------------------------------------------------------------
# Inside the open_clip process


def component_profile(model_dir: str, tsv: str, mds: str, config: str, iters: int, overrides: list[str]) -> dict:
    """Median ms of forward+loss / backward / optimizer step, alternating per iteration on one synthetic batch:
    kclip's module in its DeepSpeed engine (what `kclip train` runs), the same module with torch AdamW and
    clip_grad_norm_ (open_clip_train's recipe), and open_clip's model with its ClipLoss and AdamW; then
    forward+backward of each tower alone (kclip vs open_clip). Separates trainer overhead from the towers' code.
    Also the data pipelines' cost per batch (`data_pipeline_cost`)."""
    import open_clip
    import torch

    from kclip import dist
    from kclip.config import load_config
    from kclip.models.knowledge_clip import KnowledgeCLIP
    from kclip.tokenizers import student_tokenizer
    from kclip.train.engine import build_engine, build_optimizer, seed_everything
    from kclip.train.task import KnowledgeCLIPTask

    dist.init()
    cfg = load_config(config, overrides + PLAIN)
    tok = student_tokenizer(cfg)
    b, s, clip = cfg.train.global_batch_size, cfg.student, cfg.optim.grad_clip
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(b, 3, s.image_size, s.image_size, generator=gen)
    ids = torch.randint(3, len(tok), (b, s.text_max_len), generator=gen)
    ids[:, -1] = tok.eos_token_id  # full-length captions, as with --captions long
    mask = torch.ones_like(ids)
    seed_everything(0)
    module = KnowledgeCLIP(cfg, tok, None)
    engine = build_engine(module, cfg)
    task = KnowledgeCLIPTask(cfg, engine)  # the trainer's step glue

    def kclip_loss(model):
        return task.loss(model(pixels, ids, mask), {})[0]

    seed_everything(0)
    plain = KnowledgeCLIP(cfg, tok, None)
    plain_opt = build_optimizer(plain, cfg)
    oc = open_clip.create_model(f"local-dir:{model_dir}", output_dict=True)
    oc_loss = open_clip.ClipLoss()
    no_decay = [p for n, p in oc.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                or "logit_scale" in n]
    decay = [p for p in oc.parameters() if all(p is not q for q in no_decay)]
    o = cfg.optim
    oc_opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": o.weight_decay}],
                               lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def torch_step(model, opt):
        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
        return step

    def oc_forward():
        out = oc(pixels, ids)
        return oc_loss(out["image_features"], out["text_features"], out["logit_scale"])

    variants = {
        "kclip module, DeepSpeed engine": (lambda: kclip_loss(engine), task.backward, task.optimizer_step),
        "kclip module, torch AdamW": (lambda: kclip_loss(plain), torch.Tensor.backward, torch_step(plain, plain_opt)),
        "open_clip model, torch AdamW": (oc_forward, torch.Tensor.backward, torch_step(oc, oc_opt)),
        "kclip image tower": (lambda: plain.encode_image(pixels).square().mean(), torch.Tensor.backward, plain_opt.zero_grad),
        "open_clip image tower": (lambda: oc.encode_image(pixels).square().mean(), torch.Tensor.backward, oc_opt.zero_grad),
        "kclip text tower": (lambda: plain.encode_text(ids, mask).square().mean(), torch.Tensor.backward, plain_opt.zero_grad),
        "open_clip text tower": (lambda: oc.encode_text(ids).square().mean(), torch.Tensor.backward, oc_opt.zero_grad),
    }
    times = {name: [] for name in variants}
    names = list(variants)
    for i in range(iters + 2):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order every iteration
            forward, backward, step = variants[name]
            t0 = time.perf_counter()
            loss = forward()
            t1 = time.perf_counter()
            backward(loss)
            t2 = time.perf_counter()
            step()
            t3 = time.perf_counter()
            if i >= 2:
                times[name].append((1000 * (t1 - t0), 1000 * (t2 - t1), 1000 * (t3 - t2)))
    steps = {name: {k: median(t[j] for t in ts) for j, k in enumerate(("fwd_loss_ms", "backward_ms", "step_ms"))}
             for name, ts in times.items()}
    data = data_pipeline_cost(model_dir, tsv, mds, cfg, tok, iters)
    remove_shm_buffers(os.environ["MASTER_PORT"])
    return {"steps": steps, "data": data}


def data_pipeline_cost(model_dir: str, tsv: str, mds: str, cfg, tok, batches: int) -> dict:
    """Median ms to produce one batch in this process (num_workers=0): the CPU work each trainer's loader workers
    do per step, which on a machine without spare cores is taken from the training process. Alternating batches."""
    import open_clip
    from open_clip_train.data import CsvDataset
    from torch.utils.data import DataLoader

    from kclip.data.loader import build_loader

    b = cfg.train.global_batch_size
    _, preprocess_train, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    oc_data = CsvDataset(tsv, preprocess_train, "filepath", "title", sep="\t",
                         tokenizer=open_clip.get_tokenizer(f"local-dir:{model_dir}"))
    loaders = {
        "kclip loader (MDS, seeded augmentation, batch tokenisation)": iter(build_loader(
            mds, batch_size=b, image_size=cfg.student.image_size, train=True, student_tokenizer=tok,
            student_max_len=cfg.student.text_max_len, num_workers=0)),
        "open_clip CsvDataset (PNG files, per-sample tokenisation)": iter(DataLoader(
            oc_data, batch_size=b, shuffle=True, num_workers=0, drop_last=True)),
    }
    times = {name: [] for name in loaders}
    for i in range(batches + 1):
        for name, it in loaders.items():
            t0 = time.perf_counter()
            next(it)
            if i:  # the first batch opens shards / files
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: median(t) for name, t in times.items()}


def open_clip_worker(argv: list[str]) -> None:
    """argv = ['--count-params' MODEL | '--profile' MODEL_DIR TSV MDS CONFIG ITERS OVERRIDES... |
    open_clip_train arguments...]"""
    if argv[0] == "--count-params":
        import open_clip

        model = open_clip.create_model(argv[1])
        print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
        return
    if argv[0] == "--profile":
        print(json.dumps(component_profile(argv[1], argv[2], argv[3], argv[4], int(argv[5]), argv[6:])))
        return
    if argv[0] == "--keep-freed-memory":  # kclip's CPU allocator setting, for a like-for-like comparison
        from kclip.train.memory import keep_freed_memory

        keep_freed_memory()
        argv = argv[1:]
    from open_clip_train.main import main

    main(argv)


# ---------------------------------------------------------------------------------------------------------------
# Benchmark driver


def open_clip_model_dir(cfg, out: Path) -> Path:
    """The student of `cfg`, freshly initialised, as a `local-dir:` open_clip model folder (kclip export's writer)."""
    import torch

    from kclip.export.format import preprocess_spec
    from kclip.export.load import LoadedModel, TextTokenizer, build_encoder
    from kclip.export.save import export_model
    from kclip.tokenizers import student_tokenizer

    tokenizer = student_tokenizer(cfg)
    torch.manual_seed(cfg.train.seed)
    loaded = LoadedModel(build_encoder(cfg, tokenizer), TextTokenizer(tokenizer, cfg.student.text_max_len), cfg,
                         source="random init", preprocess=preprocess_spec(cfg.student.image_size))
    folder = out / "open_clip_model"
    shutil.rmtree(folder, ignore_errors=True)
    return export_model(loaded, folder, "open_clip")


def open_clip_args(cfg, tsv: Path, model_dir: Path, logs: Path, name: str, args) -> list[str]:
    o = cfg.optim
    return [
        "--model", f"local-dir:{model_dir}", "--train-data", str(tsv), "--dataset-type", "csv",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
        "--batch-size", str(cfg.train.global_batch_size), "--epochs", "1", "--workers", str(cfg.data.num_workers),
        "--lr", str(o.lr), "--wd", str(o.weight_decay), "--warmup", str(o.warmup_steps), "--beta1", str(o.beta1),
        "--beta2", str(o.beta2), "--eps", str(o.eps), "--grad-clip-norm", str(o.grad_clip), "--precision", "fp32",
        "--device", args.device, "--seed", str(cfg.train.seed), "--log-every-n-steps", "1", "--save-frequency", "0",
        "--logs", str(logs), "--name", name,
    ]


def kclip_overrides(cfg, mds: Path, steps: int) -> list[str]:
    return [f"data.train={mds}", "data.val=null", f"train.steps={steps}", "log.every=1", "log.tensorboard=false",
            *PLAIN, f"checkpoint.every={10 * steps}"]


def open_clip_steps(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        m = OPEN_CLIP_STEP.search(line)
        if m:
            out.append({"step": len(out) + 1, "data_ms": 1000 * float(m.group(1)), "wall_ms": 1000 * float(m.group(2))})
    return out


def kclip_steps(run_dir: Path) -> list[dict]:
    rows = read_rows(run_dir)
    wall = wall_ms_per_step(rows)
    return [{"step": r["step"], "wall_ms": wall[r["step"]], "data_ms": r["data_ms"], "student_ms": r["student_ms"]}
            for r in rows if r["step"] in wall]


def summarise(run: dict, skip: int) -> dict:
    steps = [s for s in run["steps"] if s["step"] > skip]
    return {"n": len(steps), "wall_ms": median(s["wall_ms"] for s in steps),
            "data_ms": median(s["data_ms"] for s in steps)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--open-clip-worker":
        open_clip_worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: one epoch of the split)")
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--captions", choices=("long", "natural"), default="long")
    p.add_argument("--device", default="cpu", help="open_clip --device (kclip uses the GPU when there is one)")
    p.add_argument("--open-clip-python", default=str(DEFAULT_VENV_PYTHON))
    p.add_argument("--work", help="folder for the exported data (reused when present); default a temp folder")
    p.add_argument("--profile-iters", type=int, default=15, help="iterations of the component profile (0: skip it)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--json", default=str(RESULTS / "vs_open_clip.json"))
    p.add_argument("overrides", nargs="*", help="kclip config overrides (also used to derive open_clip's arguments)")
    args = p.parse_args()
    if not Path(args.open_clip_python).is_file():
        p.error(f"{args.open_clip_python} not found: create the venv first (see the docstring)")
    os.chdir(ROOT)

    import torch

    from kclip.config import load_config
    from kclip.models.knowledge_clip import KnowledgeCLIP
    from kclip.tokenizers import student_tokenizer

    info = machine()
    cfg = load_config(args.config, args.overrides + PLAIN)
    with tempfile.TemporaryDirectory(prefix="kclip-vs-open-clip-") as tmp:
        work = Path(args.work or tmp)
        data = work / f"data_{args.captions}"
        tsv = export_split(cfg.data.train, data, cfg.student.text_max_len, args.captions)
        mds = data / "mds"
        env = bench_env(args.threads)
        if not (mds / "index.json").is_file():
            run_logged([sys.executable, "-m", "kclip.cli", "prepare", "csv", "--src", str(tsv), "--out", str(mds),
                        "--workers", "2"], data / "prepare.log", env, args.timeout)
        n = len(tsv.read_text().splitlines()) - 1
        steps = args.steps or n // cfg.train.global_batch_size
        if args.steps:  # open_clip trains whole epochs: give it exactly `steps` batches
            lines = tsv.read_text().splitlines()
            tsv = data / f"train_{steps}.tsv"
            tsv.write_text("\n".join(lines[: 1 + steps * cfg.train.global_batch_size]) + "\n")
        model_dir = open_clip_model_dir(cfg, work)

        torch.manual_seed(0)
        kclip_params = sum(p.numel() for p in KnowledgeCLIP(cfg, student_tokenizer(cfg), None).parameters())
        counted = run_logged([args.open_clip_python, __file__, "--open-clip-worker", "--count-params",
                              f"local-dir:{model_dir}"], work / "count.log", env, args.timeout)
        open_clip_params = json.loads((work / "count.log").read_text().strip().splitlines()[-1])["params"]
        print(f"parameters: kclip {kclip_params:,}, open_clip {open_clip_params:,} ({counted:.0f} s to count)")

        runs = []
        started = time.perf_counter()
        for old in [*work.glob("kclip_*"), work / "logs"]:  # runs of an earlier invocation in a reused --work
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        for r in range(args.rounds):
            for trainer, extra in KCLIP_VARIANTS.items():
                name = f"{trainer}_{r}"
                s = run_kclip(kclip_train_cmd(args.config, work / name,
                                              args.overrides + kclip_overrides(cfg, mds, steps) + extra),
                              work / f"{name}.log", env, args.timeout)
                runs.append({"trainer": trainer, "round": r, "process_s": round(s, 1), "steps": kclip_steps(work / name)})
                print(f"  {name}: {s:.0f} s, median step {summarise(runs[-1], args.skip)['wall_ms']:.0f} ms", flush=True)
            for trainer, extra in OPEN_CLIP_VARIANTS.items():
                name = f"{trainer}_{r}"
                s = run_logged([args.open_clip_python, __file__, "--open-clip-worker", *extra,
                                *open_clip_args(cfg, tsv, model_dir, work / "logs", name, args)],
                               work / f"{name}.log", env, args.timeout)
                runs.append({"trainer": trainer, "round": r, "process_s": round(s, 1),
                             "steps": open_clip_steps(work / "logs" / name / "out.log")})
                print(f"  {name}: {s:.0f} s, median step {summarise(runs[-1], args.skip)['wall_ms']:.0f} ms", flush=True)
        total_s = time.perf_counter() - started
        profile = None
        if args.profile_iters:
            run_logged([args.open_clip_python, __file__, "--open-clip-worker", "--profile", str(model_dir),
                        str(tsv), str(mds), args.config, str(args.profile_iters), *args.overrides],
                       work / "profile.log", env, args.timeout)
            profile = json.loads((work / "profile.log").read_text().strip().splitlines()[-1])

    for run in runs:
        expected = steps if run["trainer"] in OPEN_CLIP_VARIANTS else steps - 1  # kclip's first step has no predecessor row
        if len(run["steps"]) != expected:
            raise SystemExit(f"{run['trainer']} round {run['round']}: {len(run['steps'])} timed steps, expected {expected}")
    table, ratios, whole_ratios, glibc_ratios, kept_ratios = [], [], [], [], []
    for r in range(args.rounds):
        kr, gr, orun, krun = (next(x for x in runs if x["trainer"] == t and x["round"] == r)
                              for t in ("kclip", "kclip_glibc_defaults", "open_clip", "open_clip_kept_memory"))
        k, g, o, ok = (summarise(x, args.skip) for x in (kr, gr, orun, krun))
        ratios.append(k["wall_ms"] / o["wall_ms"])
        glibc_ratios.append(g["wall_ms"] / o["wall_ms"])
        kept_ratios.append(k["wall_ms"] / ok["wall_ms"])
        whole_ratios.append(kr["process_s"] / orun["process_s"])
        table.append([r, k["wall_ms"], o["wall_ms"], ratios[-1], g["wall_ms"], glibc_ratios[-1], ok["wall_ms"],
                      kept_ratios[-1], k["data_ms"], o["data_ms"], kr["process_s"], orun["process_s"], whole_ratios[-1]])
    pooled = {t: median(s["wall_ms"] for x in runs if x["trainer"] == t for s in x["steps"] if s["step"] > args.skip)
              for t in (*KCLIP_VARIANTS, *OPEN_CLIP_VARIANTS)}
    ratio = median(ratios)
    print(f"\nstep time, ms (median of steps {args.skip + 1}-{steps} of each run; {args.config} student, batch "
          f"{cfg.train.global_batch_size}, {args.captions} captions, {args.threads} thread(s), "
          f"{cfg.data.num_workers} workers)")
    print_table(["round", "kclip", "open_clip", "kclip/open_clip", "kclip, glibc malloc defaults", "/open_clip",
                 "open_clip, kclip's malloc setting", "kclip/it", "kclip data", "open_clip data", "kclip run s",
                 "open_clip run s", "run kclip/open_clip"], table, digits=2)
    whole = median(whole_ratios)
    print(f"median step ratio over rounds {ratio:.3f} (target <= {TARGET}); pooled medians kclip {pooled['kclip']:.1f} "
          f"ms, open_clip {pooled['open_clip']:.1f} ms -> {pooled['kclip'] / pooled['open_clip']:.3f}; median whole-run "
          f"ratio {whole:.3f} (target <= {WHOLE_RUN_TARGET}); with glibc's malloc defaults (train.keep_freed_memory=false) "
          f"kclip's median step ratio is {median(glibc_ratios):.3f}; against open_clip with kclip's setting "
          f"{median(kept_ratios):.3f}")
    if profile:
        print(f"\nprofile, ms (one synthetic batch of {cfg.train.global_batch_size}, full-length captions, "
              f"{args.profile_iters} iterations, variants rotated, median)")
        print_table(["variant", "fwd+loss", "backward", "step", "sum"], [[n, v["fwd_loss_ms"], v["backward_ms"],
                    v["step_ms"], sum(v.values())] for n, v in profile["steps"].items()])
        print_table(["loader, one batch in the training process (num_workers=0)", "ms"],
                    [[n, v] for n, v in profile["data"].items()])
    print(f"benchmark time {total_s / 60:.1f} min")
    write_json(args.json, {
        "benchmark": "vs_open_clip", "machine": info, "config": args.config, "overrides": args.overrides,
        "args": {**{k: v for k, v in vars(args).items() if k not in ("json", "work")},
                 # where this checkout keeps it, not this machine's absolute path
                 "open_clip_python": os.path.relpath(args.open_clip_python, ROOT)}, "steps": steps,
        "params": {"kclip": kclip_params, "open_clip": open_clip_params},
        "open_clip_version": _open_clip_version(args.open_clip_python),
        "profile_ms": profile, "ratio_per_round": ratios, "ratio_median": ratio, "target": TARGET,
        "whole_run_ratio_per_round": whole_ratios, "whole_run_ratio_median": whole, "whole_run_target": WHOLE_RUN_TARGET, "pooled_median_ms": pooled,
        "glibc_defaults_ratio_per_round": glibc_ratios, "glibc_defaults_ratio_median": median(glibc_ratios),
        "kept_memory_ratio_per_round": kept_ratios, "kept_memory_ratio_median": median(kept_ratios),
        "table": [dict(zip(["round", "kclip_ms", "open_clip_ms", "ratio", "kclip_glibc_defaults_ms",
                            "glibc_defaults_ratio", "open_clip_kept_memory_ms", "kept_memory_ratio", "kclip_data_ms",
                            "open_clip_data_ms",
                            "kclip_run_s", "open_clip_run_s", "run_ratio"], row))
                  for row in table],
        "runs": runs,
    })


def _open_clip_version(python: str) -> str:
    import subprocess

    out = subprocess.run([python, "-c", "import open_clip; print(open_clip.__version__)"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


if __name__ == "__main__":
    main()
