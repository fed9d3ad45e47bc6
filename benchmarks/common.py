"""Helpers shared by the performance benchmarks: launching `kclip train` runs, reading their per-step times, medians,
tables, and a description of the machine for the JSON results.

Every benchmark that compares variants runs them alternately in one invocation (A, B, A, B, ...) and reports medians,
so that load drifts on a shared machine hit all variants alike.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The real small teacher of the teacher benchmarks: $KCLIP_TEACHER, else where `kclip fetch-teacher` puts it.
DEMO_TEACHER = os.environ.get("KCLIP_TEACHER") or str(ROOT / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf")
# Plain CLIP: no distillation, no concepts, so no teacher is loaded; token embeddings start random (the teacher's need it).
PLAIN_CLIP = ["loss.distill_weight=0", "loss.concept_weight=0", "student.token_init=random"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Date, host hardware and software versions, and the load average when the benchmark started."""
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def rss_kib(field: str) -> int:
    """A memory field of this process from /proc/self/status, in KiB: VmRSS (now), VmHWM (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def bench_env(threads: int, **extra: str) -> dict:
    """Environment for a child training process: a single-process launch (no inherited rank variables), `threads`
    OpenMP threads (more threads than free cores make torch spin against the data workers), unbuffered output."""
    import torch

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    env.update(extra)
    return env


def run_logged(cmd: list[str], log_path: Path, env: dict, timeout: float, cwd: Path = ROOT) -> float:
    """Run `cmd` with stdout+stderr into `log_path`; returns its wall seconds; raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return seconds


def kclip_train_cmd(config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "kclip.cli", "train", "--config", config, "--output", str(run_dir), *overrides]


def remove_shm_buffers(port: int | str) -> None:
    """DeepSpeed's CPU accelerator leaves a ~69 MB /dev/shm/deepspeed_allreduce_buffer_* per process group behind;
    remove the ones of the group on `port` (the file name carries the master address and port)."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            os.remove(path)


def run_kclip(cmd: list[str], log_path: Path, env: dict, timeout: float, cwd: Path = ROOT) -> float:
    """`run_logged` for a single-process kclip command on a port chosen here, so its shared-memory buffers can be
    removed afterwards."""
    from kclip.dist import free_port

    port = free_port()
    try:
        return run_logged(cmd, log_path, dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), timeout, cwd)
    finally:
        remove_shm_buffers(port)


def read_rows(run_dir: Path) -> list[dict]:
    from kclip.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if "samples_per_s" in r]  # training rows, not eval rows


def wall_ms_per_step(rows: list[dict]) -> dict[int, float]:
    """Wall milliseconds of step s = time(s) - time(s-1), for logged rows of consecutive steps (log.every=1).

    This is the whole step as the loop sees it: data, teacher, student, k-means, logging. Step 1 has no predecessor.
    """
    out = {}
    for prev, row in itertools.pairwise(rows):
        if row["step"] == prev["step"] + 1:
            out[row["step"]] = 1000.0 * (row["time"] - prev["time"])
    return out


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def fmt(x, digits: int = 1) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def print_table(headers: list[str], rows: list[list], digits: int = 1) -> str:
    """Print (and return) a markdown table; numbers right-aligned, text left-aligned."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    numeric = [[not isinstance(c, str) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r, num in zip(cells, numeric):
        lines.append("| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, num)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def export_split(mds_dir: str, out: Path, context: int, captions: str) -> Path:
    """Demo MDS split -> out/images/*.png (RGB) + out/train.tsv; returns the TSV path."""
    from streaming import StreamingDataset

    from kclip import dist
    from kclip.data.transforms import decode_rgb

    tsv = out / "train.tsv"
    if tsv.is_file():
        return tsv
    dist.map_launcher_env()
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = StreamingDataset(local=mds_dir, shuffle=False, batch_size=1)
    lines = ["filepath\ttitle"]
    for i in range(ds.num_samples):
        record = ds.get_item(i)
        path = out / "images" / f"{i:05d}.png"
        decode_rgb(record["image"]).save(path)
        text = " ".join(record["caption"].split())  # no tabs or newlines inside a TSV field
        if captions == "long":
            text = " ".join([text] * (context // max(1, len(text)) + 1))
        lines.append(f"{path}\t{text}")
    tsv.write_text("\n".join(lines) + "\n")
    return tsv
