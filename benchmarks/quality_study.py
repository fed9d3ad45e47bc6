"""Multi-seed quality study: every variant x every seed trained by `kclip train` for the same number of steps,
evaluated by `kclip eval`, summarised as mean ± std per metric and as the paired difference to plain CLIP with its
paired t-test.

    PYTHONPATH=. python benchmarks/quality_study.py --out runs/study                  # demo, seeds 0-4, all variants
    PYTHONPATH=. python benchmarks/quality_study.py --out runs/study --variants distill_contrastive all_three
    PYTHONPATH=. python benchmarks/quality_study.py --out runs/study --dry-run        # the plan and commands only

Each run is `kclip train --config CFG --output OUT/<variant>/seed<S> train.seed=S teacher.cache_dir=OUT/teacher_cache
<variant overrides> <--overrides> [train.steps=--steps]`, then `kclip eval --checkpoint OUT/<variant>/seed<S> --data
<data.val> --label-cols ... --probe-train <data.train> [--teacher <teacher.path>] <--eval-args> --out .../eval.json`,
both as subprocesses of this Python, their output in `train.log` / `eval.log` next to the run. They run in the
repository root, so relative paths (in the config, --overrides, --eval-args) are relative to it. --eval-args is one
string: `--eval-args='--skip caption_em,knn'`.

Pairing: a seed fixes the training sample order and the student's initial weights (the projector and concept heads
are built after the student towers, and loading a pretrained teacher leaves the RNG alone), so run s of a variant and
run s of plain CLIP differ only by the variant; the differences d_s = variant_s - plain_s cancel the seed-to-seed noise
the variants share, which the two means' stds do not. Not so for `student.tokenizer=teacher` (another vocabulary, so
another text-tower init) nor for a `random_config` teacher (smoke), whose construction reseeds the global RNG.
The test on d is Student's paired t-test: t = mean(d) / SE with n - 1 degrees of freedom, two-sided p. With few seeds
the t distribution is wide (t = 3.46 is p = 0.074 at 2 degrees of freedom, where 2 SE would call it a difference), so
a difference from fewer than MIN_SEEDS paired seeds is marked as no headline number; nothing is marked "significant":
the tables are many variants x metrics, and a reader should weigh p with that in mind.

Resuming: a run with eval.json is done; one whose `checkpoints/latest` is the final step is only evaluated; anything
else is trained with `--resume auto` (continues from its checkpoint, or starts afresh). A run folder trained under
other settings (its config.yaml differs) stops the study before anything starts, so one table never mixes settings.

The teacher: all runs share OUT/teacher_cache (the cache's key covers the teacher's weights, layer, pooling, max_len,
tokenizer and the dataset, so `teacher.layer=15` gets its own entries), so each caption meets the teacher once per
teacher setting in the whole study. `--precompute-teacher` fills the cache with `kclip teacher-cache` before the first
training of each teacher setting: every training step is then a cache hit, and every run of that setting reads the
same teacher targets whichever run came first.

Output, besides the run folders:
  OUT/study.json   settings (command, date, machine and load average at start, config, steps, seeds, overrides,
                   eval args), runs[variant][seed] = every numeric eval metric, failed runs, summary[variant][metric]
                   = {mean, std, n}, paired[variant][metric] = {n, mean_diff, se, t, df, p, ratio, headline} vs
                   plain (headline: n >= MIN_SEEDS)
  OUT/study.md     the same settings, a table of mean ± std (variant rows, key metric columns), a table of
                   Δ ± SE (ratio) p vs plain, where † marks a difference over fewer than MIN_SEEDS seeds
  OUT/<metric>.png one per key metric: a bar per variant (mean, error bar = std), a dot per seed
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from common import ROOT, bench_env, machine, print_table, run_kclip, write_json
from scipy import stats

from kclip.config import (
    Config,
    ConfigError,
    diff_configs,
    from_dict,
    load_config,
    to_dict,
)
from kclip.validate import validate
from kclip.report import is_number, natural, save
from kclip.train.checkpoint import tag_for
from kclip.train.metrics import read_metrics

BASELINE = "plain"
# Paired seeds a difference needs to be a headline number: below 5, its SE rests on at most 3 degrees of freedom and
# the t-test's 5% critical value is 3.18 (3 df) or 4.30 (2 df), far from the 2 of "beyond 2 SE".
MIN_SEEDS = 5

# The student's vocabulary, stated by every variant so that its meaning does not follow the config's defaults (the
# demo's are the teacher's tokenizer and token embeddings, the study's pick): bytes with random token embeddings, or the
# teacher's tokenizer with the teacher's token embeddings.
BYTES = ["student.tokenizer=byte", "student.token_init=random"]
TEACHER_TOKENS = ["student.tokenizer=teacher", "student.token_init=teacher"]

# name -> overrides on top of the study's config. Same seed = same data order and student init, so every variant is
# compared with `plain` run by run (see the module docstring).
# The concept heads' own optimizer group (kclip/train/engine.py, optim.head_*), and the heads in the towers' group
# (the library's default). Every variant names one of the two and its beta, so that it keeps its meaning when the demo
# config changes them (the demo had the towers' pace and beta 0.01 until 2026-12-08).
HEADS_OWN_PACE = ["optim.head_grad_clip=1.0", "optim.head_eps=1e-10", "optim.head_lr_scale=10"]
TOWER_PACE_HEADS = ["optim.head_grad_clip=null", "optim.head_eps=null", "optim.head_lr_scale=1.0"]
VARIANTS: dict[str, list[str]] = {
    # CLIP's contrastive loss alone: the baseline every difference is taken against.
    "plain": ["loss.distill_weight=0", "loss.concept_weight=0", *BYTES, *TOWER_PACE_HEADS],
    # Plain CLIP on the teacher's vocabulary with random token embeddings: no teacher knowledge at all, and the same
    # text-tower shape as the teacher-vocabulary variants, which it separates the vocabulary's share of their gain from.
    "plain_teacher_vocab": ["loss.distill_weight=0", "loss.concept_weight=0", "student.tokenizer=teacher",
                            "student.token_init=random", *TOWER_PACE_HEADS],
    # The teacher's token embeddings as the start, and no teacher loss: against plain_teacher_vocab it is the
    # initialisation's share of the teacher's gain, against the teacher-loss variants the losses' share.
    "token_init_alone": ["loss.distill_weight=0", "loss.concept_weight=0", *TEACHER_TOKENS, *TOWER_PACE_HEADS],
    # Distillation alone in its landed default form: does the teacher's text embedding help without concepts?
    "distill_raw_cosine": ["loss.concept_weight=0", "loss.distill_kind=cosine", "loss.distill_target=raw", *BYTES,
                           *TOWER_PACE_HEADS],
    # Cosine to mean-centred teacher embeddings: does removing the teacher's common direction (anisotropy) help?
    "distill_centered_cosine": ["loss.concept_weight=0", "loss.distill_kind=cosine", "loss.distill_target=centered",
                                *BYTES, *TOWER_PACE_HEADS],
    # Cosine to whitened teacher embeddings: does equalising the teacher's dimensions help further?
    "distill_whitened_cosine": ["loss.concept_weight=0", "loss.distill_kind=cosine", "loss.distill_target=whitened",
                                *BYTES, *TOWER_PACE_HEADS],
    # Match the batch's similarity structure instead of the vectors: is the geometry what transfers?
    "distill_relational": ["loss.concept_weight=0", "loss.distill_kind=relational", "loss.distill_target=centered",
                           *BYTES, *TOWER_PACE_HEADS],
    # Contrastive distillation (the teacher's own caption is the positive among the batch's): sharper than cosine?
    "distill_contrastive": ["loss.concept_weight=0", "loss.distill_kind=contrastive", "loss.distill_target=centered",
                            *BYTES, *TOWER_PACE_HEADS],
    # Concept learning alone (k-means concepts of the teacher's embeddings, no distillation).
    "concepts_only": ["loss.distill_weight=0", *BYTES, *TOWER_PACE_HEADS, "loss.concept_weight=0.01"],
    # beta: 10x the paper's 0.01, which leaves the concept heads almost untrained at this scale.
    "concepts_beta0.1": ["loss.distill_weight=0", "loss.concept_weight=0.1", *BYTES, *TOWER_PACE_HEADS],
    # tau: softer soft labels (0.2 instead of 0.05) carry more of each caption's similarity to every concept.
    "concepts_tau0.2": ["loss.distill_weight=0", "concepts.tau=0.2", *BYTES, *TOWER_PACE_HEADS,
                        "loss.concept_weight=0.01"],
    # Knowledge-CLIP's three losses together, with the contrastive distillation form.
    "all_three": ["loss.distill_kind=contrastive", "loss.distill_target=centered", *BYTES, *TOWER_PACE_HEADS,
                  "loss.concept_weight=0.01"],
    # The teacher's middle layer instead of its last: are mid-layer features a better target?
    "distill_contrastive_mid_layer": ["loss.concept_weight=0", "loss.distill_kind=contrastive",
                                      "loss.distill_target=centered", "teacher.layer=15", *BYTES, *TOWER_PACE_HEADS],
    # The teacher's tokenizer and token embeddings for the student instead of bytes: does the teacher's vocabulary help?
    "distill_contrastive_teacher_tok": ["loss.concept_weight=0", "loss.distill_kind=contrastive",
                                        "loss.distill_target=centered", *TEACHER_TOKENS, *TOWER_PACE_HEADS],
    # The same with concept learning on: all three objectives with the teacher's vocabulary, at the paper's beta
    # (the demo's default until 2026-12-08).
    "all_three_teacher_tok": ["loss.distill_kind=contrastive", "loss.distill_target=centered", *TEACHER_TOKENS,
                              *TOWER_PACE_HEADS, "loss.concept_weight=0.01"],
    # The same with the concept heads at their own pace (own optimizer group: 10x lr, eps 1e-10, clipped apart from
    # the towers), without which the heads' gradients at beta 0.01 fall below AdamW's eps once clipped with the towers.
    "all_three_heads_own_pace": ["loss.distill_kind=contrastive", "loss.distill_target=centered", *TEACHER_TOKENS,
                                 *HEADS_OWN_PACE, "loss.concept_weight=0.01"],
    # ... with beta 0.1: the concept gradient on the towers from 0.8% of the contrastive one (at the start) to ~10%
    # (the demo's default since 2026-12-08, chosen on val by the study of that day).
    "all_three_heads_own_pace_beta0.1": ["loss.distill_kind=contrastive", "loss.distill_target=centered",
                                         *TEACHER_TOKENS, *HEADS_OWN_PACE, "loss.concept_weight=0.1"],
    # ... with 100 concepts instead of 32, and with softer labels (tau 0.2 instead of 0.05).
    "all_three_heads_own_pace_k100": ["loss.distill_kind=contrastive", "loss.distill_target=centered",
                                      *TEACHER_TOKENS, *HEADS_OWN_PACE, "concepts.k=100", "loss.concept_weight=0.01"],
    "all_three_heads_own_pace_tau0.2": ["loss.distill_kind=contrastive", "loss.distill_target=centered",
                                        *TEACHER_TOKENS, *HEADS_OWN_PACE, "concepts.tau=0.2", "loss.concept_weight=0.01"],
}

# Config sections that do not change what a run learns: a run folder that differs only there is still comparable.
SETTINGS_IGNORED = ("checkpoint.", "log.", "eval.", "dist.")


class StudyError(RuntimeError):
    pass


@dataclass
class Run:
    variant: str
    seed: int
    folder: Path
    overrides: list[str]
    cfg: Config  # resolved exactly as `kclip train` will resolve it


# ---------------------------------------------------------------------------------------------------------------
# Planning: which runs exist, what each still needs (a pure function of the run folders and the resolved configs)


def make_runs(config: str, variants: dict[str, list[str]], seeds: list[int], out: Path, common: list[str]) -> list[Run]:
    """Every (variant, seed) run, its config resolved and validated now, so a typo in a variant or a key this checkout
    lacks fails here, before hours of other runs."""
    runs = []
    for name, variant_overrides in variants.items():
        for seed in seeds:
            overrides = [f"train.seed={seed}", f"teacher.cache_dir={out / 'teacher_cache'}", *variant_overrides,
                         *common]
            try:
                cfg = load_config(config, overrides)
                validate(cfg, 1)
            except ConfigError as e:
                raise StudyError(f"variant {name}: {e}") from e
            runs.append(Run(name, seed, out / name / f"seed{seed}", overrides, cfg))
    return runs


def split_files(split: str) -> tuple[str, str]:
    """(a run's metrics file, the study's file stem) for an evaluation split: the val split keeps the names studies
    have always written (eval.json, study.*), another split gets its own (eval_test.json, study_test.*)."""
    return ("eval.json", "study") if split == "val" else (f"eval_{split}.json", f"study_{split}")


def split_data(cfg: Config, split: str) -> str:
    """The MDS folder of `split`: data.val itself, or its sibling of that name (the demo's data/demo/test)."""
    return cfg.data.val if split == "val" else str(Path(cfg.data.val).parent / split)


def next_action(folder: Path, cfg: Config, metrics_file: str = "eval.json") -> str:
    """What the run in `folder` still needs: "done" (its `metrics_file` exists), "evaluate" (its `latest` checkpoint
    is the final step) or "train" (empty, or a checkpoint to resume from). Raises StudyError if the folder was
    trained with other settings than `cfg`."""
    saved = folder / "config.yaml"
    if saved.is_file():
        changed = [c for c in diff_configs(from_dict(yaml.safe_load(saved.read_text())), cfg)
                   if not c.startswith(SETTINGS_IGNORED)]
        if changed:
            raise StudyError(f"{folder} was trained with other settings ({'; '.join(changed)}): "
                             "use another --out, or remove that folder")
    if (folder / metrics_file).is_file():
        return "done"
    latest = folder / "checkpoints" / "latest"
    if latest.is_file() and latest.read_text().strip() == tag_for(cfg.train.steps):
        return "evaluate"
    return "train"


def train_command(config: str, run: Run) -> list[str]:
    return [sys.executable, "-m", "kclip.cli", "train", "--config", config, "--output", str(run.folder),
            "--resume", "auto", *run.overrides]


def eval_command(run: Run, label_cols: str, teacher: str | None, eval_args: list[str], split: str = "val") -> list[str]:
    """`kclip eval` of the run on `split` (split_data), probes trained on its train split. `teacher` (the study
    config's teacher.path) gives runs without a teacher, plain CLIP included, the teacher kNN overlap too."""
    cmd = [sys.executable, "-m", "kclip.cli", "eval", "--checkpoint", str(run.folder), "--data",
           split_data(run.cfg, split), "--label-cols", label_cols, "--probe-train", run.cfg.data.train,
           "--out", str(run.folder / split_files(split)[0])]
    return cmd + (["--teacher", teacher] if teacher else []) + eval_args


def cache_fill_command(config: str, run: Run, out: Path) -> list[str]:
    """`kclip teacher-cache` for `run`'s teacher setting. Its --output is only where the cache would go without
    teacher.cache_dir, which every run sets."""
    return [sys.executable, "-m", "kclip.cli", "teacher-cache", "--config", config,
            "--output", str(out / "_cache_fill"), *run.overrides]


def teacher_setting(cfg: Config) -> str:
    """Runs with equal settings here read the same rows of the teacher cache."""
    return json.dumps([to_dict(cfg)["teacher"], cfg.data.train], sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Statistics (pure)


def run_metrics(raw: dict) -> dict[str, float]:
    """The numeric entries of a `kclip eval` metrics file (the protocol/... strings dropped), plus
    retrieval/mean_R@k = the mean of image->text and text->image R@k."""
    out = {k: float(v) for k, v in raw.items() if is_number(v)}
    for key in list(out):
        if key.startswith("retrieval/i2t_R@") and key.replace("i2t", "t2i") in out:
            out[key.replace("i2t", "mean")] = (out[key] + out[key.replace("i2t", "t2i")]) / 2
    return out


def concept_kl(folder: Path) -> dict[str, float]:
    """train/concept_kl_{first,end}: the run's logged concept KL (mean over heads, nats) in the first logging window
    after the concept bank's first fit, and in the last; train/concept_kl_ratio = end / first. Empty for a run
    without concept learning."""
    rows = [r for r in read_metrics(folder) if "loss/concept/kl" in r]
    if not rows:
        return {}
    first, end = rows[0]["loss/concept/kl"], rows[-1]["loss/concept/kl"]
    return {"train/concept_kl_first": first, "train/concept_kl_end": end, "train/concept_kl_ratio": end / first}


def describe(values: list[float]) -> dict:
    """Mean and sample std (ddof=1; None for fewer than 2 values) over seeds."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def paired_t_p(t: float, df: int) -> float:
    """Two-sided p of Student's t statistic `t` with `df` degrees of freedom."""
    return float(2 * stats.t.sf(abs(t), df))


def paired_difference(variant: dict[int, float], baseline: dict[int, float]) -> dict:
    """Over the seeds both have: mean of d_s = variant_s - baseline_s, its standard error std(d, ddof=1)/sqrt(n),
    the paired t-test (t = mean / SE, df = n - 1, two-sided p; None without 2 seeds or when every d_s is equal, where
    t is undefined), the ratio mean(variant)/mean(baseline), and whether n reaches MIN_SEEDS (`headline`)."""
    seeds = sorted(set(variant) & set(baseline))
    d = [variant[s] - baseline[s] for s in seeds]
    n = len(d)
    mean_d = statistics.fmean(d) if d else None
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else None
    t = mean_d / se if se else None
    base_mean = statistics.fmean(baseline[s] for s in seeds) if seeds else None
    ratio = statistics.fmean(variant[s] for s in seeds) / base_mean if base_mean else None
    return {"n": n, "mean_diff": mean_d, "se": se, "t": t, "df": n - 1 if t is not None else None,
            "p": paired_t_p(t, n - 1) if t is not None else None, "ratio": ratio, "headline": n >= MIN_SEEDS}


def summarize(runs: dict[str, dict[int, dict[str, float]]], baseline: str) -> tuple[dict, dict]:
    """(summary[variant][metric] = describe(...), paired[variant][metric] = paired_difference(...) vs `baseline`)
    from runs[variant][seed][metric]."""
    summary, paired = {}, {}
    for variant, by_seed in runs.items():
        metrics = sorted({m for values in by_seed.values() for m in values}, key=natural)
        series = {m: {s: v[m] for s, v in by_seed.items() if m in v} for m in metrics}
        summary[variant] = {m: describe([series[m][s] for s in sorted(series[m])]) for m in metrics}
        if variant != baseline and baseline in runs:
            base = runs[baseline]
            paired[variant] = {m: paired_difference(series[m], {s: v[m] for s, v in base.items() if m in v})
                               for m in metrics if any(m in v for v in base.values())}
    return summary, paired


def key_metrics(label_cols: list[str], present: set[str]) -> list[str]:
    """The metrics the tables and plots show, in this order, where any run has them."""
    keys = ["retrieval/mean_R@10", "retrieval/i2t_R@10", "retrieval/t2i_R@10", "retrieval/i2t_R@1",
            "retrieval/t2i_R@1", *(f"zeroshot/{c}/top1" for c in label_cols),
            *(f"probe/linear/{c}/top1" for c in label_cols), "probe/teacher_knn_overlap",
            "probe/teacher_knn_overlap_centred", "probe/caption_em", "train/concept_kl_end", "train/concept_kl_ratio"]
    return [k for k in keys if k in present]


# ---------------------------------------------------------------------------------------------------------------
# Reports


def mean_std_cell(stats: dict | None) -> str:
    if not stats or stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["std"] is not None else "")


def paired_cell(p: dict | None) -> str:
    if not p or p["mean_diff"] is None:
        return "–"
    text = f"{p['mean_diff']:+.3f}" + (f" ± {p['se']:.3f}" if p["se"] is not None else "")
    text += f" ({p['ratio']:.2f}x)" if p["ratio"] is not None else ""
    text += f" p={p['p']:.3f}" if p["p"] is not None else ""
    return text + ("" if p["headline"] else " †")


def markdown(study: dict) -> str:
    keys, variants = study["key_metrics"], list(study["runs"])
    lines = [f"# Quality study: {study['config']}, {study['steps']} steps, seeds {study['seeds']}, evaluated on "
             f"{study.get('split', 'val')}", "",
             "    " + study["command"], "",
             f"{study['machine']['date_utc']} UTC, {study['machine']['cpu']} ({study['machine']['cpu_count']} cores), "
             f"GPU {study['machine']['gpu']}, load average at start {study['machine']['load_avg_1_5_15']}.",
             f"Overrides on every run: {' '.join(study['common_overrides']) or 'none'}; eval arguments: "
             f"{' '.join(study['eval_args']) or 'none'}.", "", "## Mean ± std over seeds (ddof=1)", ""]
    lines.append(print_table(["variant", "n", *keys], [
        [v, str(max((s['n'] for s in study["summary"][v].values()), default=0)),
         *(mean_std_cell(study["summary"][v].get(k)) for k in keys)] for v in variants]))
    lines += ["", f"## Paired difference to {study['baseline']}: Δ ± SE (ratio) p", "",
              f"Δ = mean over seeds of (variant - {study['baseline']}) on the same seed, SE = std(Δ, ddof=1)/√n, "
              f"ratio = mean(variant)/mean({study['baseline']}), p = two-sided paired t-test (t = Δ/SE, n - 1 "
              f"degrees of freedom; one test per cell, not corrected for the table's many cells); † marks a "
              f"difference over fewer than {MIN_SEEDS} seeds, not a headline number.", ""]
    lines.append(print_table(["variant", *keys], [
        [v, *(paired_cell(study["paired"][v].get(k)) for k in keys)] for v in variants if v in study["paired"]]))
    notes = [f"- {v}: its teacher differs from {study['baseline']}'s ({'; '.join(d)}), and `kclip eval` computes "
             "probe/teacher_knn_overlap with the run's own teacher settings, so that column is not comparable."
             for v, d in study["teacher_differs"].items()]
    notes += [f"- failed: {f['variant']} seed {f['seed']} ({f['log']})" for f in study["failed"]]
    if notes:
        lines += ["", "## Notes", "", *notes]
    prefix = "" if study.get("split", "val") == "val" else f"{study['split']}_"
    lines += ["", "## Plots", "", *(f"![{k}]({prefix}{plot_name(k)})" for k in keys)]
    return "\n".join(lines) + "\n"


def plot_name(metric: str) -> str:
    return metric.replace("/", "_") + ".png"


def plot_metric(study: dict, metric: str, path: Path) -> None:
    """A bar per variant at the mean over seeds, error bar = std, and a dot per seed."""
    variants = list(study["runs"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(variants) + 1.5), 3.8))
    for i, v in enumerate(variants):
        stats = study["summary"][v].get(metric)
        if not stats:
            continue
        ax.bar(i, stats["mean"], yerr=stats["std"] or 0.0, color=f"C{i}", alpha=0.6, capsize=4)
        seeds = [m[metric] for m in study["runs"][v].values() if metric in m]
        ax.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{metric} ({study['steps']} steps, seeds {study['seeds']})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Running


def duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="study folder: run folders, teacher cache, study.json/.md, plots")
    p.add_argument("--config", default="demo", help="named config or YAML file every run starts from")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(MIN_SEEDS)),
                   help=f"training seeds (default 0..{MIN_SEEDS - 1}; fewer than {MIN_SEEDS} give no headline numbers)")
    p.add_argument("--variants", nargs="+", help="subset of the table (default: all); the baseline is always added")
    p.add_argument("--baseline", default=BASELINE, help="the variant every paired difference is taken against "
                   f"(default {BASELINE}; plain_teacher_vocab for the teacher-vocabulary variants)")
    p.add_argument("--define", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                   help="NAME OVERRIDE ...: add a variant to the table or replace one (repeatable)")
    p.add_argument("--steps", type=int, help="train.steps of every run (default: the config's)")
    p.add_argument("--overrides", nargs="+", default=[], help="a.b=c applied to every run, after the variant's")
    p.add_argument("--label-cols", default="category,subcategory", help="label columns of the val split (kclip eval)")
    p.add_argument("--split", default="val", help="the split every run is evaluated on: val (data.val, where variants "
                   "are chosen) or the name of data.val's sibling folder (test: the numbers reported after the "
                   "choice); each split has its own eval_<split>.json per run and study_<split>.md")
    p.add_argument("--eval-args", type=shlex.split, default=shlex.split("--skip caption_em"),
                   help="extra `kclip eval` arguments as one string (default: '--skip caption_em', whose GRU decoder "
                   "would add minutes per run; pass '' to include it)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each with --threads threads)")
    p.add_argument("--train-only", action="store_true", help="train the runs, evaluate none (a later call evaluates)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads of each run (the loader workers need the "
                   "other cores)")
    p.add_argument("--precompute-teacher", action="store_true",
                   help="fill the shared teacher cache with `kclip teacher-cache` before training each teacher setting")
    p.add_argument("--dry-run", action="store_true", help="print the plan and commands; run nothing, write nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_machine = machine()  # before any run, so the load average is the machine's, not the study's
    out = args.out.resolve()  # absolute: the runs' config.yaml must not depend on the directory the study resumes from
    if Path(args.config).suffix in (".yaml", ".yml"):
        args.config = str(Path(args.config).resolve())
    # The runs execute in the repository root (common.run_logged), where the configs' relative data and teacher paths
    # point; resolve and validate them here from the same place.
    os.chdir(ROOT)
    table = VARIANTS | {name: overrides for name, *overrides in args.define}
    # The baseline is always part of a study: every paired difference needs it (done runs are reused, not rerun).
    names = list(dict.fromkeys([args.baseline, *(args.variants or table)]))
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"quality_study: unknown variant(s) {unknown}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    common = args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
    try:
        base = load_config(args.config, common)
        if not base.data.val:
            raise StudyError(f"{args.config}: data.val is not set; the runs are evaluated on it "
                             "(--overrides data.val=DIR)")
        runs = make_runs(args.config, {n: table[n] for n in names}, args.seeds, out, common)
        metrics_file, study_name = split_files(args.split)
        if not Path(split_data(base, args.split)).is_dir():
            raise StudyError(f"--split {args.split}: no folder {split_data(base, args.split)}")
        actions = {id(r): next_action(r.folder, r.cfg, metrics_file) for r in runs}
    except (ConfigError, StudyError) as e:
        print(f"quality_study: {e}", file=sys.stderr)
        return 2
    label_cols = [c for c in args.label_cols.split(",") if c]
    todo = [r for r in runs if actions[id(r)] != "done"]
    counts = {a: sum(actions[id(r)] == a for r in runs) for a in ("train", "evaluate", "done")}
    print(f"{len(runs)} runs ({len(names)} variants x {len(args.seeds)} seeds, {base.train.steps} steps of "
          f"{args.config}): {counts['train']} to train, {counts['evaluate']} to evaluate on {args.split}, "
          f"{counts['done']} done; logs in {out}/<variant>/seed<S>/{{train,eval}}.log")
    if len(set(args.seeds)) < MIN_SEEDS:
        print(f"{len(set(args.seeds))} seeds: the paired differences will be marked † in study.md, not headline "
              f"numbers (they need at least {MIN_SEEDS})")

    fills = {}  # teacher setting -> the first run that will train with it
    if args.precompute_teacher:
        for r in todo:
            if r.cfg.needs_teacher and r.cfg.teacher.cache and actions[id(r)] == "train":
                fills.setdefault(teacher_setting(r.cfg), r)
    if args.dry_run:
        for r in fills.values():
            print(f"teacher-cache ({r.variant}): {shlex.join(cache_fill_command(args.config, r, out))}")
        for r in todo:
            if actions[id(r)] == "train":
                print(f"{r.variant} seed{r.seed} train: {shlex.join(train_command(args.config, r))}")
            print(f"{r.variant} seed{r.seed} eval: "
                  f"{shlex.join(eval_command(r, args.label_cols, base.teacher.path, args.eval_args, args.split))}")
        return 0

    env = bench_env(args.threads)
    for r in fills.values():
        (out / "_cache_fill").mkdir(parents=True, exist_ok=True)
        log = out / "_cache_fill" / f"{r.variant}.log"
        seconds = run_kclip(cache_fill_command(args.config, r, out), log, env, timeout=None)
        print(f"teacher cache filled for {r.variant}'s teacher in {duration(seconds)} ({log})")

    failed, started, finished = [], time.perf_counter(), 0
    todo = [r for r in todo if not (args.train_only and actions[id(r)] == "evaluate")]

    def execute(r: Run) -> str:
        r.folder.mkdir(parents=True, exist_ok=True)
        try:
            if actions[id(r)] == "train":
                run_kclip(train_command(args.config, r), r.folder / "train.log", env, timeout=None)
            if args.train_only:
                return "trained"
            run_kclip(eval_command(r, args.label_cols, base.teacher.path, args.eval_args, args.split),
                      r.folder / f"{Path(metrics_file).stem}.log", env, timeout=None)
            return "trained and evaluated" if actions[id(r)] == "train" else "evaluated"
        except RuntimeError as e:  # one broken variant must not cost the other runs of an unattended study
            failed.append({"variant": r.variant, "seed": r.seed, "log": str(r.folder)})
            return f"FAILED ({str(e).strip().splitlines()[-1]}; logs in {r.folder})"

    # Each run uses --threads OpenMP threads plus its loader workers: on a small machine two runs side by side keep
    # the cores busier than one run with twice the threads (measured in BENCHMARKS.md's quality-study section).
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(execute, r): (r, time.perf_counter()) for r in todo}
        for future in as_completed(futures):
            r, t0 = futures[future]
            finished += 1
            elapsed = time.perf_counter() - started
            eta = elapsed / finished * (len(todo) - finished)
            print(f"[{finished}/{len(todo)}] {r.variant} seed{r.seed}: {future.result()} "
                  f"(elapsed {duration(elapsed)}, ETA {duration(eta)})", flush=True)

    results: dict[str, dict[int, dict[str, float]]] = {}
    for r in runs:
        if (r.folder / metrics_file).is_file():
            results.setdefault(r.variant, {})[r.seed] = (run_metrics(json.loads((r.folder / metrics_file).read_text()))
                                                         | concept_kl(r.folder))
    summary, paired = summarize(results, args.baseline)
    present = {m for by_seed in results.values() for metrics in by_seed.values() for m in metrics}
    teachers = {r.variant: r.cfg.teacher for r in runs}
    study = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["quality_study.py", *argv]),
        "machine": start_machine, "config": args.config, "steps": base.train.steps, "seeds": args.seeds,
        "baseline": args.baseline, "variants": {n: table[n] for n in names}, "common_overrides": common,
        "eval_args": args.eval_args, "label_cols": label_cols, "split": args.split,
        "key_metrics": key_metrics(label_cols, present),
        "teacher_differs": {n: d for n in names if (d := diff_configs(teachers[args.baseline], teachers[n]))},
        "runs": {v: {s: results[v][s] for s in sorted(results[v])} for v in names if v in results},
        "failed": failed, "summary": summary, "paired": paired,
    }
    write_json(out / f"{study_name}.json", study)
    (out / f"{study_name}.md").write_text(markdown(study))
    for metric in study["key_metrics"]:
        plot_metric(study, metric, out / (("" if args.split == "val" else f"{args.split}_") + plot_name(metric)))
    print(f"wrote {out / f'{study_name}.md'} and {len(study['key_metrics'])} plots")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
