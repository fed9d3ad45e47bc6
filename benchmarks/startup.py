"""Where a short run's time goes before its first step: `kclip train` start-up, phase by phase.

    PYTHONPATH=. python benchmarks/startup.py                    # -> benchmarks/results/startup.json
    PYTHONPATH=. python benchmarks/startup.py --base HEAD~1      # and the same runs of another commit, alternating
    PYTHONPATH=. python benchmarks/startup.py --configs smoke --cold-op --rounds 1   # DeepSpeed's op built afresh

Each run is `kclip train --config CONFIG train.steps=1 log.every=1 data.val=null` in one process (`smoke` on the
synthetic shapes data of tests/shapes.py, `demo` on data/demo with the real teacher), `--rounds` times, configs (and,
with `--base`, trees: a detached `git worktree` of the ref, removed afterwards) alternating. Phases, from the
`start-up` lines the trainer logs (seconds since `import kclip`) and step 1's metrics row:

  imports          interpreter start to the process group: kclip, torch, streaming, transformers, ...
  process group    `import deepspeed`, its CPU communication op (built when TORCH_EXTENSIONS_DIR has no copy), the group
  teacher          build_teacher: a random one, or a GGUF file read, de-quantised and loaded
  student+engine   the student, its token init, deepspeed.initialize
  loader           the training StreamingDataset and the teacher cache
  first batch      step 1's data_ms: loader workers start, the first shard is read
  first step       step 1's teacher_ms + student_ms + kmeans_ms
  other            the rest up to the end of step 1: run folder, config.yaml, checkpointer, validator, training log
  to first step    launch to the end of step 1 (its metrics row), on this process's clock
  exit             final checkpoint and interpreter exit

`--cold-op` gives every run an empty TORCH_EXTENSIONS_DIR, so the process group phase includes building the op.
Also, before the runs: `import kclip.cli` alone (`python -c "import kclip.cli"` less `python -c pass`) and
`kclip COMMAND --help` for every command, median of `--command-repeats` each.
With `--base`, the ratio this tree / base of "to first step" and of the whole run per round, and their medians.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    ROOT,
    bench_env,
    kclip_train_cmd,
    machine,
    median,
    print_table,
    read_rows,
    run_kclip,
    write_json,
)

# dist.log_startup's lines: "start-up 12.34 s: teacher built in 10.12 s"
STARTUP_LINE = re.compile(r"start-up ([0-9.]+) s: (.+) in ([0-9.]+) s$")
# A phase's line, by what it says is done.
LOGGED = {"process group": "process group", "teacher": "teacher built", "student+engine": "engine built",
          "loader": "loader"}
PHASES = ("imports", *LOGGED, "first batch", "first step", "other", "to first step", "exit", "total")
OVERRIDES = ["train.steps=1", "log.every=1", "data.val=null"]


def phases(log_text: str, step1: dict, step1_end: float, total: float) -> dict:
    """Seconds per phase of one run: its output, step 1's metrics row, the end of step 1 and the run's end, both
    from launch. A tree that logs no start-up lines (older than them) gets NaN for the phases they measure."""
    logged = {}
    for line in log_text.splitlines():
        m = STARTUP_LINE.search(line)
        if m:
            name = next((k for k, words in LOGGED.items() if words in m[2]), None)
            if name:
                logged[name] = (float(m[1]), float(m[3]))  # (since start, the phase's own)
    if logged:  # a run without a teacher logs no teacher line
        logged.setdefault("teacher", (math.nan, 0.0))
    out = {k: logged[k][1] if k in logged else math.nan for k in LOGGED}
    out["imports"] = logged["process group"][0] - logged["process group"][1] if "process group" in logged else math.nan
    out["first batch"] = step1["data_ms"] / 1000
    out["first step"] = sum(step1.get(k, 0.0) for k in ("teacher_ms", "student_ms", "kmeans_ms")) / 1000
    out["to first step"], out["exit"], out["total"] = step1_end, total - step1_end, total
    out["other"] = step1_end - sum(out[k] for k in ("imports", *LOGGED, "first batch", "first step"))
    return out


def command_seconds(tree: Path, repeats: int) -> dict:
    """Median wall seconds in `tree`, alternating: `python -c pass`, `import kclip.cli` (less the interpreter's),
    and `kclip COMMAND --help` for every command (interpreter included)."""
    from kclip.cli import COMMANDS

    env = dict(os.environ, PYTHONPATH=str(tree))
    argvs = {"interpreter": ["-c", "pass"], "import kclip.cli": ["-c", "import kclip.cli"],
             **{f"{c} --help": ["-m", "kclip.cli", c, "--help"] for c in COMMANDS}}
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(repeats):
        for name, argv in argvs.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, check=False)
            times[name].append(time.perf_counter() - t0)
    out = {k: median(v) for k, v in times.items()}
    out["import kclip.cli"] -= out["interpreter"]
    return out


@contextlib.contextmanager
def worktree(ref: str):
    """A detached checkout of `ref`, with this checkout's data/ and teachers/ (ignored by git) linked in."""
    parent = Path(tempfile.mkdtemp(prefix="kclip-startup-"))
    path = parent / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True, capture_output=True)
    try:
        for name in ("data", "teachers"):
            if (ROOT / name).exists():
                (path / name).symlink_to((ROOT / name).resolve())
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)
        shutil.rmtree(parent, ignore_errors=True)


def train_once(config: str, tree: Path, data_overrides: list[str], work: Path, name: str, env: dict,
               cold_op: bool, timeout: float) -> dict:
    run_dir, log = work / name, work / f"{name}.log"
    env = dict(env, PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory(prefix="kclip-ext-") as ext:
        if cold_op:
            env["TORCH_EXTENSIONS_DIR"] = ext
        launched = time.time()
        total = run_kclip(kclip_train_cmd(config, run_dir, [*OVERRIDES, *data_overrides]), log, env, timeout, tree)
    step1 = next(r for r in read_rows(run_dir) if r["step"] == 1)
    return phases(log.read_text(), step1, step1["time"] - launched, total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["smoke", "demo"])
    p.add_argument("--base", help="git ref to run alongside this tree (e.g. main, HEAD~1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--command-repeats", type=int, default=3)
    p.add_argument("--cold-op", action="store_true", help="an empty TORCH_EXTENSIONS_DIR for every run")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=str(RESULTS / "startup.json"))
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from shapes import make_shapes_mds

    info = machine()
    env = bench_env(args.threads)
    extensions = env.get("TORCH_EXTENSIONS_DIR", "unset: torch's default under ~/.cache/torch_extensions")
    extensions = extensions.replace(str(Path.home()), "~", 1)
    with tempfile.TemporaryDirectory(prefix="kclip-startup-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        trees = {"this": ROOT}
        if args.base:
            trees["base"] = stack.enter_context(worktree(args.base))
        with contextlib.redirect_stdout(io.StringIO()):  # `kclip prepare`'s statistics
            data = {"smoke": [f"data.train={make_shapes_mds(work / 'shapes')}"]}
        commits = {name: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                                        text=True).stdout.strip() for name, tree in trees.items()}
        commands = {name: command_seconds(tree, args.command_repeats) for name, tree in trees.items()}
        runs = []
        for r in range(args.rounds):
            for config in args.configs:
                for tree_name, tree in trees.items():
                    name = f"{config}_{tree_name}_{r}"
                    result = train_once(config, tree, data.get(config, []), work, name, env, args.cold_op,
                                        args.timeout)
                    runs.append({"config": config, "tree": tree_name, "round": r, **result})
                    print(f"  {name}: to first step {result['to first step']:.1f} s, total {result['total']:.1f} s",
                          flush=True)

    rows = [[config, tree, *(median(x[k] for x in runs if x["config"] == config and x["tree"] == tree) for k in PHASES)]
            for config in args.configs for tree in trees]
    print(f"\nseconds, median of {args.rounds} round(s); {args.threads} thread(s); TORCH_EXTENSIONS_DIR "
          f"{'empty per run' if args.cold_op else extensions}")
    print_table(["config", "tree", *PHASES], rows, digits=2)
    print_table(["seconds", *trees], [[k, *(commands[t][k] for t in trees)] for k in commands["this"]], digits=3)
    ratios = {}
    if args.base:
        def run(config, tree, r):
            return next(x for x in runs if (x["config"], x["tree"], x["round"]) == (config, tree, r))

        ratios = {c: {k: [run(c, "this", r)[k] / run(c, "base", r)[k] for r in range(args.rounds)]
                      for k in ("to first step", "total")} for c in args.configs}
        print_table(["config", "this/base to first step", "this/base total"],
                    [[c, median(v["to first step"]), median(v["total"])] for c, v in ratios.items()], digits=3)
    write_json(args.json, {
        "benchmark": "startup", "machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"},
        "commits": commits,
        "torch_extensions_dir": "empty per run" if args.cold_op else extensions, "commands_s": commands,
        "median_s": [dict(zip(["config", "tree", *PHASES], row)) for row in rows], "ratios_per_round": ratios,
        "runs": runs,
    })


if __name__ == "__main__":
    main()
