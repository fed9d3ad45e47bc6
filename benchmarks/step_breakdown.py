"""Where a Knowledge-CLIP training step spends its time, against plain CLIP on the same student, data and steps.

    PYTHONPATH=. python benchmarks/step_breakdown.py            # -> benchmarks/results/step_breakdown.json
    PYTHONPATH=. python benchmarks/step_breakdown.py --config smoke --cold-steps 40 train.global_batch_size=16

Runs (one process each, `kclip train`, log.every=1, alternating Knowledge-CLIP and plain CLIP):
    round 0   Knowledge-CLIP, `--cold-steps` steps from an empty teacher cache (cold first epoch, then epoch 2),
              then plain CLIP (loss.distill_weight=0 loss.concept_weight=0) over the same steps;
    round r   Knowledge-CLIP reusing round 0's teacher cache (`teacher.cache_dir`): the same seed gives the same
              sample order, so its `--warm-steps` steps are all cache hits; then plain CLIP again.
Then, in this process, the student's forward+loss / backward / optimizer step are timed separately (the training
loop only logs their sum as student_ms), alternating the Knowledge-CLIP and plain-CLIP models on one real batch, and
the concept k-means fit is timed on a full embedding buffer.

Per step, from metrics.jsonl: wall ms = time(step) - time(step - 1) (everything the loop does), and the loop's own
phase timers data_ms / teacher_ms / student_ms / kmeans_ms. A step is "cold" when no caption of its batch was in the
teacher cache, "warm" when all were, "mixed" otherwise (per-step hits from the cumulative hit rate). The first
`--skip` steps of every run are left out of the medians (allocator and loader warm-up).

The k-means share is projected for the config's own schedule (train.steps, concepts.warmup_steps/recompute_every):
fits x fit time / (cold steps x cold step + remaining steps x warm step + fits x fit time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from common import (
    PLAIN_CLIP,
    RESULTS,
    ROOT,
    bench_env,
    kclip_train_cmd,
    machine,
    median,
    print_table,
    read_rows,
    remove_shm_buffers,
    run_kclip,
    wall_ms_per_step,
    write_json,
)

PHASES = ("data_ms", "teacher_ms", "student_ms")
RATIO_TARGET = 1.15


def base_overrides(steps: int) -> list[str]:
    # No TensorBoard and no evaluation: at log.every=1 they would add per-step work that real runs do not have.
    return [f"train.steps={steps}", "log.every=1", "log.tensorboard=false", "data.val=null",
            f"checkpoint.every={10 * steps}"]


def per_step(rows: list[dict]) -> list[dict]:
    """One record per logged step: wall ms, phase ms, cache hits of that step's batch, k-means fit seconds."""
    wall = wall_ms_per_step(rows)
    out, prev_hits, prev_samples = [], 0.0, 0
    for row in rows:
        samples = row["count/samples"] - prev_samples  # one process: samples per step = per-rank lookups
        prev_samples = row["count/samples"]
        rec = {"step": row["step"], "wall_ms": wall.get(row["step"]), "samples": samples,
               **{k: row.get(k, 0.0) for k in PHASES}, "kmeans_s": row.get("concepts/seconds")}
        if "teacher_cache_hit_rate" in row:
            hits = row["teacher_cache_hit_rate"] * row["count/samples"]
            rec["hits"] = round(hits - prev_hits)
            prev_hits = hits
            rec["kind"] = "warm" if rec["hits"] == samples else "cold" if rec["hits"] == 0 else "mixed"
        else:
            rec["kind"] = "plain"
        out.append(rec)
    return out


def train_run(name: str, config: str, overrides: list[str], work: Path, env: dict, timeout: float) -> dict:
    run_dir = work / name
    started = time.perf_counter()
    process_s = run_kclip(kclip_train_cmd(config, run_dir, overrides), work / f"{name}.log", env, timeout)
    steps = per_step(read_rows(run_dir))
    step_s = sum(s["wall_ms"] or 0.0 for s in steps) / 1000
    print(f"  {name}: {len(steps)} steps, process {process_s:.0f} s ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"name": name, "overrides": overrides, "process_s": round(process_s, 1),
            "startup_and_exit_s": round(process_s - step_s, 1), "steps": steps}


def select(runs: list[dict], kind: str, skip: int, *, from_step: int = 0) -> list[dict]:
    return [s for r in runs for s in r["steps"]
            if s["kind"] == kind and s["step"] > skip and s["step"] >= from_step and s["wall_ms"] is not None]


def phase_row(label: str, steps: list[dict]) -> list:
    wall = median(s["wall_ms"] for s in steps)
    phases = [median(s[k] for s in steps) for k in PHASES]
    return [label, len(steps), wall, *phases, wall - sum(phases)]


def student_phases(config: str, overrides: list[str], teacher_dim: int, iters: int, fits: int) -> dict:
    """Median ms of forward+loss, backward and optimizer step for both models, alternating per iteration on one real
    batch, and the k-means fit on a full buffer. Teacher embeddings are random unit vectors of the teacher's width:
    the student's cost does not depend on their values."""
    import torch
    import torch.nn.functional as F

    from kclip import dist
    from kclip.concepts.bank import ConceptBank
    from kclip.config import load_config
    from kclip.data.loader import build_loader
    from kclip.models.knowledge_clip import KnowledgeCLIP
    from kclip.tokenizers import student_tokenizer
    from kclip.train.engine import build_engine, seed_everything
    from kclip.train.task import KnowledgeCLIPTask

    dist.init()
    cfgs = {"kclip": load_config(config, overrides), "plain": load_config(config, overrides + PLAIN_CLIP)}
    cfg = cfgs["kclip"]
    tokenizer = student_tokenizer(cfg)
    batch = next(iter(build_loader(
        cfg.data.train, batch_size=cfg.train.global_batch_size, image_size=cfg.student.image_size, train=True,
        student_tokenizer=tokenizer, student_max_len=cfg.student.text_max_len, num_workers=0)))
    b = batch["pixels"].shape[0]
    gen = torch.Generator().manual_seed(0)
    bank = ConceptBank(cfg.concepts.k, teacher_dim, niter=cfg.concepts.niter, seed=cfg.concepts.seed)
    buffer = F.normalize(torch.randn(cfg.concepts.buffer_size, teacher_dim, generator=gen), dim=1)
    fit_s = []
    for _ in range(fits):
        fit_s.append(bank.fit(buffer)["seconds"])
    teacher_emb = F.normalize(torch.randn(b, teacher_dim, generator=gen), dim=1)
    soft_labels = bank.soft_labels(teacher_emb, cfg.concepts.tau)

    tasks = {}
    for name, c in cfgs.items():
        seed_everything(c.train.seed)
        model = KnowledgeCLIP(c, tokenizer, teacher_dim if name == "kclip" else None)
        engine = build_engine(model, c)
        tasks[name] = KnowledgeCLIPTask(c, engine)  # the trainer's step glue, fed the random targets above
    times = {name: {"fwd_loss_ms": [], "backward_ms": [], "step_ms": []} for name in cfgs}
    order = list(cfgs)
    for i in range(iters + 2):
        for name in order if i % 2 == 0 else order[::-1]:
            task = tasks[name]
            targets = {"teacher_target": teacher_emb, "soft_labels": soft_labels} if name == "kclip" else {}
            t0 = time.perf_counter()
            total, _ = task.loss(task.forward(batch), targets)
            t1 = time.perf_counter()
            task.backward(total)
            t2 = time.perf_counter()
            task.optimizer_step()
            t3 = time.perf_counter()
            if i >= 2:  # two warm-up iterations
                for key, dt in zip(times[name], (t1 - t0, t2 - t1, t3 - t2)):
                    times[name][key].append(1000 * dt)
    remove_shm_buffers(os.environ["MASTER_PORT"])
    return {
        "batch": b, "iters": iters, "teacher_dim": teacher_dim,
        "medians_ms": {n: {k: median(v) for k, v in t.items()} for n, t in times.items()},
        "kmeans_full_buffer": {"rows": cfg.concepts.buffer_size, "k": cfg.concepts.k, "dim": teacher_dim,
                               "niter": cfg.concepts.niter, "seconds": fit_s, "median_s": median(fit_s)},
    }


def fit_steps(steps: int, warmup: int, every: int) -> list[int]:
    """The steps (1-based, completed) after which the concept bank is fitted; the rule of kclip.train.task.concept_fit_due."""
    return [s for s in range(1, steps + 1)
            if s == warmup or (every > 0 and s > warmup and (s - warmup) % every == 0)]


def kmeans_share(cfg, steps_per_epoch: int, cold_ms: float, warm_ms: float, first_fit_s: float, full_fit_s: float) -> dict:
    """k-means share of a whole run at the config's schedule (a projection from the measured medians)."""
    fits = fit_steps(cfg.train.steps, cfg.concepts.warmup_steps, cfg.concepts.recompute_every)
    rows_at = [min(s * cfg.train.global_batch_size, cfg.concepts.buffer_size) for s in fits]
    fit_s = [first_fit_s if r < cfg.concepts.buffer_size else full_fit_s for r in rows_at]
    cold = min(steps_per_epoch, cfg.train.steps)
    train_s = (cold * cold_ms + (cfg.train.steps - cold) * warm_ms) / 1000
    total = train_s + sum(fit_s)
    return {"train_steps": cfg.train.steps, "fit_after_steps": fits, "fit_seconds": fit_s,
            "kmeans_s": sum(fit_s), "steps_s": train_s, "share": sum(fit_s) / total if total else float("nan"),
            "share_if_all_steps_warm": sum(fit_s) / (cfg.train.steps * warm_ms / 1000 + sum(fit_s))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--cold-steps", type=int, default=60, help="round 0 steps (>= one epoch covers the cold epoch)")
    p.add_argument("--warm-steps", type=int, default=20, help="steps of each later round (all warm)")
    p.add_argument("--rounds", type=int, default=3, help="total rounds including round 0")
    p.add_argument("--skip", type=int, default=2, help="leading steps of each run left out of the medians")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the training processes")
    p.add_argument("--micro-iters", type=int, default=20, help="iterations of the fwd/bwd/step timing")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per training process")
    p.add_argument("--json", default=str(RESULTS / "step_breakdown.json"))
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.global_batch_size=32")
    args = p.parse_args()
    if args.rounds < 1 or args.warm_steps > args.cold_steps:
        p.error("--rounds must be >= 1 and --warm-steps <= --cold-steps (warm rounds replay round 0's samples)")

    import torch

    from kclip.config import load_config
    from kclip.config.preflight import mds_num_samples

    os.chdir(ROOT)  # config paths (data/demo/train, teachers/...) are relative to the repository
    torch.set_num_threads(args.threads)
    info = machine()
    cfg = load_config(args.config, args.overrides)
    steps_per_epoch = mds_num_samples(cfg.data.train) // cfg.train.global_batch_size
    env = bench_env(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kclip-step-breakdown-") as tmp:
        work = Path(tmp)
        cache = [f"teacher.cache_dir={work / 'teacher_cache'}"]
        kclip_runs, plain_runs = [], []
        for r in range(args.rounds):
            steps = args.cold_steps if r == 0 else args.warm_steps
            common = base_overrides(steps) + args.overrides
            kclip_runs.append(train_run(f"kclip_{r}", args.config, common + cache, work, env, args.timeout))
            plain_runs.append(train_run(f"plain_{r}", args.config, common + PLAIN_CLIP, work, env, args.timeout))
        meta = next((work / "teacher_cache").glob("*/node0/meta.json"))
        teacher_dim = json.loads(meta.read_text())["dim"]
    micro = student_phases(args.config, args.overrides, teacher_dim, args.micro_iters, fits=3)
    total_s = time.perf_counter() - started

    skip = args.skip
    groups = {
        "kclip cold (epoch 1)": select(kclip_runs[:1], "cold", skip),
        "kclip mixed (epoch 2)": select(kclip_runs[:1], "mixed", skip),
        "kclip warm (epoch 2, all hits)": select(kclip_runs[:1], "warm", skip),
        "kclip warm (rounds >= 1)": select(kclip_runs[1:], "warm", skip),
        "plain (epoch 1, all rounds)": [s for s in select(plain_runs, "plain", skip) if s["step"] <= steps_per_epoch],
        "plain (epoch 2, round 0)": select(plain_runs[:1], "plain", skip, from_step=steps_per_epoch + 1),
    }
    print(f"\nper-step medians, ms ({args.config}, global batch {cfg.train.global_batch_size}, "
          f"{steps_per_epoch} steps/epoch, {args.threads} thread(s), first {skip} steps of each run skipped)")
    phase_table = [phase_row(label, steps) for label, steps in groups.items() if steps]
    print_table(["steps", "n", "wall", "data", "teacher", "student", "other"], phase_table)

    ratios = []
    for r in range(1, args.rounds):
        warm = median(s["wall_ms"] for s in select(kclip_runs[r:r + 1], "warm", skip))
        plain = median(s["wall_ms"] for s in select(plain_runs[r:r + 1], "plain", skip))
        ratios.append({"round": r, "kclip_warm_ms": warm, "plain_ms": plain, "ratio": warm / plain})
    epoch2 = [s for s in select(kclip_runs[:1], "warm", skip) + select(kclip_runs[:1], "mixed", skip)]
    plain2 = groups["plain (epoch 2, round 0)"]
    round0_ratio = (median(s["wall_ms"] for s in epoch2) / median(s["wall_ms"] for s in plain2)
                    if epoch2 and plain2 else float("nan"))
    ratio = median(x["ratio"] for x in ratios)
    print("\nwarm-cache Knowledge-CLIP step / plain-CLIP step (wall, medians per round)")
    print_table(["round", "kclip warm ms", "plain ms", "ratio"], [[x["round"], x["kclip_warm_ms"], x["plain_ms"],
                                                                    x["ratio"]] for x in ratios], digits=3)
    print(f"median ratio over rounds: {ratio:.3f} (target <= {RATIO_TARGET}); round 0 epoch-2 steps "
          f"(incl. mixed): {round0_ratio:.3f}")

    m = micro["medians_ms"]
    print(f"\nstudent phases, ms (batch {micro['batch']}, {args.micro_iters} alternating iterations, median)")
    print_table(["model", "fwd+loss", "backward", "step", "sum"],
                [[n, v["fwd_loss_ms"], v["backward_ms"], v["step_ms"], sum(v.values())] for n, v in m.items()])

    fits = [s for s in kclip_runs[0]["steps"] if s["kmeans_s"] is not None]
    first_fit_s = fits[0]["kmeans_s"] if fits else micro["kmeans_full_buffer"]["median_s"]
    # A fit on a full buffer: measured in the cold run where one happened, else the stand-alone fit on random rows.
    full = [s["kmeans_s"] for s in fits if s["step"] * cfg.train.global_batch_size >= cfg.concepts.buffer_size]
    full_fit_s = median(full) if full else micro["kmeans_full_buffer"]["median_s"]
    cold_ms = median(s["wall_ms"] for s in groups["kclip cold (epoch 1)"])
    warm_ms = median(s["wall_ms"] for s in groups["kclip warm (rounds >= 1)"] or groups["kclip warm (epoch 2, all hits)"])
    share = kmeans_share(cfg, steps_per_epoch, cold_ms, warm_ms, first_fit_s, full_fit_s)
    print(f"\nk-means fits in the runs: {[(s['step'], round(s['kmeans_s'], 3)) for s in fits]}; full buffer "
          f"({micro['kmeans_full_buffer']['rows']} x {teacher_dim}, k={cfg.concepts.k}): "
          f"{micro['kmeans_full_buffer']['median_s']:.3f} s")
    print(f"k-means share of a {cfg.train.steps}-step run at fits {share['fit_after_steps']}: "
          f"{100 * share['share']:.2f}% ({100 * share['share_if_all_steps_warm']:.2f}% if every step were warm)")
    print(f"total benchmark time {total_s / 60:.1f} min")

    write_json(args.json, {
        "benchmark": "step_breakdown", "machine": info, "config": args.config, "overrides": args.overrides,
        "args": {k: v for k, v in vars(args).items() if k != "json"}, "steps_per_epoch": steps_per_epoch,
        "global_batch_size": cfg.train.global_batch_size, "total_minutes": round(total_s / 60, 2),
        "phase_medians_ms": {row[0]: dict(zip(["n", "wall", "data", "teacher", "student", "other"], row[1:]))
                             for row in phase_table},
        "warm_over_plain": {"per_round": ratios, "median": ratio, "target": RATIO_TARGET,
                            "round0_epoch2": None if math.isnan(round0_ratio) else round0_ratio},
        "student_phases": micro, "kmeans_share": share,
        "runs": {"kclip": kclip_runs, "plain": plain_runs},
    })


if __name__ == "__main__":
    main()
