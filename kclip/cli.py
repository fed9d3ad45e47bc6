"""`kclip` command line: prepare data, fetch the demo teacher, precompute teacher embeddings, train (and launch it with
stop signals passed to the ranks), evaluate, export (also an evaluation split, for clip_benchmark), embed, report."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from kclip import console
from kclip.config import ConfigError


def fail(message: str, code: int) -> int:
    print(f"kclip: error: {message}", file=sys.stderr)
    return code


def one_line(error: BaseException) -> str:
    """The error's message. One raised in a DataLoader worker reaches the main process re-created with the worker's
    traceback as its text: its last line, without the exception's type, is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def call_collective(fn, *args, known_errors: tuple[type[Exception], ...] = (), **kwargs) -> tuple[object, int]:
    """(fn(...), 0); or (None, 1) after printing one line when fn raises a known error. A collective that failed
    because a rank died ends the process after its one line, exit 1. Anything else propagates with its traceback."""
    from kclip import dist

    try:
        return fn(*args, **kwargs), 0
    except (*known_errors, dist.RendezvousError) as e:
        return None, fail(one_line(e), 1)
    except Exception as e:
        lost = dist.describe_failure(e)
        if lost is None:
            raise
        dist.exit_after_lost_peer(fail(lost, 1))


def load_run_config(config: str, overrides: list[str]):
    """The config of a run on the ranks this launch will start, validated before any process group exists; raises
    ConfigError naming the first impossible key."""
    from kclip import dist
    from kclip.config import load_config
    from kclip.config.preflight import shm_shortfall
    from kclip.validate import validate

    cfg = load_config(config, overrides)
    dist.map_launcher_env()
    validate(cfg, int(os.environ["WORLD_SIZE"]), local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]))
    shortfall = shm_shortfall(int(os.environ["LOCAL_WORLD_SIZE"]))
    if shortfall:
        raise ConfigError(shortfall)
    return cfg


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kclip train", description="Train a Knowledge-CLIP student.")
    parser.add_argument("--config", required=True, help="named config (demo, smoke, cc3m-llama2-7b-vitb16) or a YAML file")
    parser.add_argument("--output", required=True, help="run folder: config.yaml, metrics.jsonl, log.txt, "
                        "tensorboard/, checkpoints/")
    parser.add_argument("--resume", help="latest (the run folder's newest checkpoint), auto (latest if there is one, "
                        "else start fresh: for requeued jobs), or a checkpoint folder")
    parser.add_argument("--allow-config-change", action="store_true", help="resume even if the config differs")
    parser.add_argument("--overwrite", action="store_true", help="start from scratch in a folder that holds a run, "
                        "deleting its checkpoints and logs")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 loss.concept_weight=0")
    console.add_verbose_flag(parser)
    args = console.parse_args(parser, argv)
    from kclip.train import signals

    signals.install()  # before the heavy imports: a stop signal during start-up is honoured, not fatal

    from kclip import dist
    from kclip.config.preflight import check_writable
    from kclip.train.run_folder import RunFolderError, check_fresh_start

    resume = args.resume
    if resume == "auto":
        resume = "latest" if os.path.isfile(os.path.join(args.output, "checkpoints", "latest")) else None
    try:
        cfg = load_run_config(args.config, args.overrides)
        check_fresh_start(Path(args.output), resume, args.overwrite)
        check_writable("--output", Path(args.output))
    except (ConfigError, RunFolderError) as e:
        return fail(str(e), 2)

    from kclip.data.datasets import DataError
    from kclip.teacher.cache import TeacherCacheError
    from kclip.train.checkpoint import CheckpointError
    from kclip.train.loop import train
    from kclip.train.state import TrainingError

    start = time.monotonic()
    try:
        result, code = call_collective(train, cfg, args.output, resume=resume,
                                       allow_config_change=args.allow_config_change, overwrite=args.overwrite,
                                       known_errors=(TrainingError, CheckpointError, ConfigError, TeacherCacheError,
                                                     RunFolderError, DataError))
    except KeyboardInterrupt:
        fail("aborted by a second interrupt, without a checkpoint; continue from the last one with --resume latest", 130)
        return console.interrupted()
    if code:
        return code
    if dist.is_main():
        print("\n".join(train_summary(args, cfg.train.steps, result, time.monotonic() - start)))
    return 0


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues the run: this one, with `--resume latest` for its --resume or --overwrite."""
    options = ["--config", args.config, "--output", args.output, "--resume", "latest"]
    options += ["--allow-config-change"] * args.allow_config_change + ["--verbose"] * args.verbose
    command = shlex.join(["train", *options, *args.overrides])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the launcher's own arguments are not visible to a rank
        return f"the same launcher, running kclip.cli {command}"
    return f"{'kclip' if Path(sys.argv[0]).name == 'kclip' else 'python -m kclip.cli'} {command}"


def train_summary(args: argparse.Namespace, steps: int, result: dict, seconds: float) -> list[str]:
    """What a finished or stopped run prints last: its final losses and evaluation, and where everything is."""
    from kclip.train.metrics import read_metrics

    run = Path(args.output)
    stopped = result.get("preempted_at")
    minutes, secs = divmod(round(seconds), 60)
    head = f"stopped by a signal after step {stopped} of {steps}" if stopped is not None else f"done, {steps} steps"
    lines = [f"kclip train: {head} in {minutes}m {secs:02d}s"]
    rows = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    last = next((row for row in reversed(rows) if "loss/total" in row), None)
    if last:
        # The total and its terms; their parts (loss/concept/image, loss/distill/mean_baseline) are in metrics.jsonl.
        terms = sorted((k for k in last if k.startswith("loss/") and k.count("/") == 1),
                       key=lambda k: (k != "loss/total", k))
        lines.append(f"  losses at step {last['step']}: " + ", ".join(f"{k[5:]} {last[k]:.4f}" for k in terms))
    evaluation = result.get("eval") or {}
    if evaluation:
        recall = "   ".join(
            f"{d} R@1/5/10 " + " / ".join(f"{evaluation[f'retrieval/{d}_R@{k}']:.3f}" for k in (1, 5, 10))
            for d in ("i2t", "t2i"))
        lines.append(f"  eval on data.val ({evaluation['num_samples']} pairs): {recall}")
    latest = run / "checkpoints" / "latest"
    lines.append(f"  checkpoint: {run / 'checkpoints' / latest.read_text().strip() if latest.is_file() else 'none'}")
    logs = [p for p in (run / "metrics.jsonl", run / "tensorboard", run / "log.txt") if p.exists()]
    lines.append(f"  logs: {', '.join(map(str, logs))}; plots: kclip report {shlex.quote(str(run))} --out "
                 f"{shlex.quote(str(run / 'report'))}")
    more = "" if stopped is not None else " (raise train.steps to train further)"
    lines.append(f"  resume{more}: {resume_command(args)}")
    return lines


def teacher_cache_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kclip teacher-cache",
                                     description="Embed every training caption with the teacher once, into the "
                                     "cache `kclip train` reads.")
    parser.add_argument("--config", required=True, help="the config `kclip train` will use (named or a YAML file)")
    parser.add_argument("--output", required=True, help="the run folder `kclip train` will use (the cache goes to "
                        "RUN/teacher_cache unless teacher.cache_dir is set)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for kclip train")
    console.add_verbose_flag(parser)
    args = console.parse_args(parser, argv)

    from kclip import dist
    from kclip.data.datasets import DataError
    from kclip.teacher.cache import TeacherCacheError
    from kclip.teacher.precompute import precompute

    try:
        cfg = load_run_config(args.config, args.overrides)
        if not cfg.needs_teacher:
            raise ConfigError("teacher-cache: this config uses no teacher (loss.distill_weight and loss.concept_weight are 0)")
        if not cfg.teacher.cache:
            raise ConfigError("teacher-cache: teacher.cache is false, so training would not read the cache")
    except ConfigError as e:
        return fail(str(e), 2)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    with console.run_log(Path(args.output)):
        result, code = call_collective(precompute, cfg, args.output, known_errors=(TeacherCacheError, DataError))
    if code:
        return code
    if dist.is_main():
        print(json.dumps(result, indent=1))
    return 0


COMMANDS = {
    "prepare": "kclip.data.cli:prepare_main",
    "fetch-teacher": "kclip.teacher.fetch:main",
    "teacher-cache": "kclip.cli:teacher_cache_main",
    "train": "kclip.cli:train_main",
    "launch": "kclip.launch:main",
    "eval": "kclip.eval.run:main",
    "export": "kclip.export.save:main",
    "export-wds": "kclip.eval.wds:main",
    "embed": "kclip.export.embed:main",
    "report": "kclip.report:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher puts --local_rank=N in front of the arguments; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank=")]
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: kclip {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    if argv[0] != "launch":  # the launcher's own process logs nothing; its ranks set up their consoles
        # Before the command's module is imported: import-time warnings and library handlers are sorted too.
        console.setup(verbose="--verbose" in argv)
    module, function = COMMANDS[argv[0]].split(":")
    # Imported on demand: each subcommand pulls in heavy libraries (deepspeed, streaming) only when it runs.
    return getattr(importlib.import_module(module), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
