"""`kclip report RUN_DIR [RUN_DIR ...] --out DIR`: plots of training runs and a table comparing them.

OUT/
  losses.png        every loss/* term over steps (one panel per term, one line per run)
  lr.png, logit_scale.png
  throughput.png    per run: mean milliseconds per step spent in data / teacher / student / k-means (stacked;
                    k-means time is spread over its logging window) and samples/s (right axis)
  concepts.png      concept drift and moved ids at every k-means (re)fit; cluster sizes (sorted) at the last fit
  eval.png          every eval/* metric over steps
  concept_map_<run>.png   PCA of teacher caption embeddings coloured by concept (kclip.eval.concept_map), for runs
                    with a teacher and a fitted concept bank; skipped with a note when impossible or --no-concept-map
  report.md         final values side by side: the last logged value of every metrics.jsonl key, and RUN/eval.json
                    (e.g. `kclip eval --out RUN/eval.json`) when present; then the plots and notes
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kclip import console

TIMES = ("data_ms", "teacher_ms", "student_ms", "kmeans_ms")
NOT_METRICS = ("step", "time")


class Run:
    def __init__(self, folder: Path, name: str):
        from kclip.train.metrics import (
            read_metrics,  # its module imports torch: not before the arguments are parsed
        )

        self.folder, self.name = folder, name
        if not (folder / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: no metrics.jsonl (not a kclip run folder)")
        self.rows = read_metrics(folder)
        eval_file = folder / "eval.json"
        self.eval = json.loads(eval_file.read_text()) if eval_file.is_file() else {}

    def series(self, key: str) -> tuple[list[int], list]:
        """(steps, values) of the rows that logged `key` (a resumed run's repeated steps keep the last value)."""
        by_step = {r["step"]: r[key] for r in self.rows if key in r}
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def metric_keys(self, prefix: str = "") -> list[str]:
        found = {k for r in self.rows for k, v in r.items() if k.startswith(prefix) and is_number(v)}
        return sorted(found - set(NOT_METRICS))

    def final(self) -> dict[str, float]:
        out = {}
        for key in self.metric_keys():
            out[key] = self.series(key)[1][-1]
        return out


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_names(folders: list[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


def panels(n: int):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_keys(runs: list[Run], keys: list[str], path: Path, title: str) -> Path | None:
    """One panel per key, one line per run."""
    if not keys:
        return None
    fig, axes = panels(len(keys))
    # A run keeps its colour in every panel, also where other runs have no line (loss/distill of plain CLIP).
    colours = {run.name: f"C{i}" for i, run in enumerate(runs)}
    for ax, key in zip(axes, keys):
        for run in runs:
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=run.name,
                        color=colours[run.name])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    # One legend for the figure: a panel may show only some of the runs (e.g. loss/distill of a plain-CLIP run).
    labelled = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(labelled.values(), labelled.keys(), loc="upper right", fontsize=8)
    fig.suptitle(title)
    return save(fig, path)


def plot_throughput(runs: list[Run], path: Path) -> Path | None:
    runs = [r for r in runs if any(r.series(k)[0] for k in TIMES)]
    if not runs:
        return None
    fig, axes = panels(len(runs))
    for ax, run in zip(axes, runs):
        steps = sorted({r["step"] for r in run.rows if any(k in r for k in TIMES)})
        rows = {r["step"]: r for r in run.rows if any(k in r for k in TIMES)}
        stacks = [[rows[s].get(k, 0.0) for s in steps] for k in TIMES]
        ax.stackplot(steps, stacks, labels=[k.removesuffix("_ms") for k in TIMES], alpha=0.8)
        ax.set_ylabel("ms per step")
        ax.set_xlabel("step")
        ax.set_title(run.name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        s_steps, rate = run.series("samples_per_s")
        if s_steps:
            right = ax.twinx()
            right.plot(s_steps, rate, color="black", linewidth=1)
            right.set_ylabel("samples/s")
    fig.suptitle("time per phase and throughput")
    return save(fig, path)


def plot_concepts(runs: list[Run], path: Path) -> Path | None:
    runs = [r for r in runs if r.series("concepts/sizes")[0]]
    if not runs:
        return None
    fig, axes = panels(3)
    for run in runs:
        for ax, key in zip(axes[:2], ("concepts/drift", "concepts/moved_ids")):
            steps, values = run.series(key)
            ax.plot(steps, values, marker="o", label=run.name)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step (k-means fit)")
        steps, sizes = run.series("concepts/sizes")
        axes[2].plot(sorted(sizes[-1], reverse=True), marker=".", label=f"{run.name} (step {steps[-1]})")
    axes[2].set_title("cluster sizes at the last fit", fontsize=9)
    axes[2].set_xlabel("concept (sorted by size)")
    axes[2].set_ylabel("embeddings")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def natural(key: str) -> list:
    """Sort key putting R@5 before R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def table(runs: list[Run], values: list[dict]) -> list[str]:
    keys = sorted({k for v in values for k, x in v.items() if is_number(x)},
                  key=lambda k: (not k.startswith("eval/"), not k.startswith("loss/"), natural(k)))
    lines = ["| metric | " + " | ".join(r.name for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(fmt(v.get(k)) for v in values) + " |" for k in keys]
    return lines


def concept_maps(runs: list[Run], out: Path, data: str | None, limit: int) -> tuple[list[Path], list[str]]:
    """PCA concept maps for the runs that allow one; notes say why the others have none."""
    from kclip.config import from_dict
    from kclip.eval.concept_map import concept_map
    from kclip.export.format import ModelLoadError, read_model_states
    from kclip.train import checkpoint

    images, notes = [], []
    for run in runs:
        try:
            tag_dir = checkpoint.resolve(run.folder, "latest")
            client = read_model_states(tag_dir)
        except (checkpoint.CheckpointError, ModelLoadError) as e:
            notes.append(f"{run.name}: no concept map ({e})")
            continue
        cfg = from_dict(client["config"])
        concepts = client.get("concepts")
        if not cfg.needs_teacher or not concepts or concepts.get("centroids") is None:
            notes.append(f"{run.name}: no concept map (the run has no teacher or no fitted concept bank)")
            continue
        source = data or cfg.data.val or cfg.data.train
        path = out / f"concept_map_{run.name.replace('/', '_')}.png"
        try:
            stats = concept_map(cfg, concepts, source, path, title=f"{run.name} step {client['step']}", limit=limit)
        except (OSError, ValueError, RuntimeError) as e:
            notes.append(f"{run.name}: no concept map ({type(e).__name__}: {e})")
            continue
        images.append(path)
        notes.append(f"{run.name}: concept map from checkpoint {tag_dir.name} (k={stats['k']}) and the teacher's "
                     f"embeddings of {stats['num_captions']} captions of {source}")
    return images, notes


def report(folders: list[str | Path], out: str | Path, *, data: str | None = None, concept_map_samples: int = 2000,
           with_concept_map: bool = True) -> Path:
    """Write the plots and report.md for the runs; returns the path of report.md."""
    folders = [Path(f) for f in folders]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(f, n) for f, n in zip(folders, run_names(folders))]
    keys = sorted({k for r in runs for k in r.metric_keys()}, key=natural)
    plots = [
        plot_keys(runs, [k for k in keys if k.startswith("loss/")], out / "losses.png", "loss terms"),
        plot_keys(runs, ["lr"] if "lr" in keys else [], out / "lr.png", "learning rate"),
        plot_keys(runs, ["logit_scale"] if "logit_scale" in keys else [], out / "logit_scale.png", "logit scale"),
        plot_throughput(runs, out / "throughput.png"),
        plot_concepts(runs, out / "concepts.png"),
        plot_keys(runs, [k for k in keys if k.startswith("eval/")], out / "eval.png", "evaluation during training"),
    ]
    notes = []
    if with_concept_map:
        maps, notes = concept_maps(runs, out, data, concept_map_samples)
        plots += maps
    else:
        notes.append("concept maps skipped (--no-concept-map)")
    lines = ["# kclip runs", "", *[f"- **{r.name}**: `{r.folder}`" for r in runs], "",
             "## Final values (last logged value in metrics.jsonl)", "", *table(runs, [r.final() for r in runs])]
    if any(r.eval for r in runs):
        lines += ["", "## kclip eval (RUN/eval.json)", "", *table(runs, [r.eval for r in runs])]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kclip report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and report.md")
    p.add_argument("--data", help="MDS folder for the concept maps' captions (default: each run's data.val/train)")
    p.add_argument("--concept-map-samples", type=int, default=2000)
    p.add_argument("--no-concept-map", action="store_true", help="skip the concept maps (they load the teacher)")
    console.add_verbose_flag(p)
    args = console.parse_args(p, argv)
    try:
        md = report(args.runs, args.out, data=args.data, concept_map_samples=args.concept_map_samples,
                    with_concept_map=not args.no_concept_map)
    except (OSError, ValueError) as e:
        print(f"kclip report: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"report": str(md), "files": sorted(p.name for p in md.parent.iterdir())}))
    return 0
