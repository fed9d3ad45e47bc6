"""`kclip train` end to end: one process, 2 ranks under the deepspeed launcher, exact resume after SIGKILL, the
plain-CLIP baseline without a teacher, and configs rejected before any process group starts."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from shapes import make_shapes_mds

from kclip.dist import free_port
from kclip.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=96)


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def train_cmd(run: Path, data: Path, *overrides: str, ranks: int = 1, resume: str | None = None) -> list[str]:
    if ranks == 1:
        cmd = [sys.executable, "-m", "kclip.cli"]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "kclip.cli"]
    cmd += ["train", "--config", "smoke", "--output", str(run), f"data.train={data}", "dist.timeout_s=60", *overrides]
    return cmd + (["--resume", resume] if resume else [])


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss/total"] for row in read_metrics(run) if "loss/total" in row}


def test_single_process_smoke_trains_and_writes_run_folder(shapes, tmp_path):
    run = tmp_path / "run"
    run_ok(train_cmd(run, shapes, "train.steps=30", f"data.val={shapes}"))
    rows = read_metrics(run)
    loss = losses(run)
    assert loss[30] < loss[5], loss
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    fits = [r for r in rows if "concepts/drift" in r]
    assert fits, "the concept bank was never fitted"
    final = [r for r in rows if "eval/retrieval/i2t_R@1" in r][-1]
    assert final["eval/num_samples"] == 96


TWO_RANK_RUN = ("train.steps=24", "log.every=1", "checkpoint.every=8")


@pytest.fixture(scope="module")
def reference_run(shapes, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run under the deepspeed launcher."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_ok(train_cmd(run, shapes, *TWO_RANK_RUN, ranks=2))
    return run


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    """The losses every interrupted run must reproduce."""
    return losses(reference_run)


def start_two_ranks(run: Path, shapes: Path) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(run, shapes, *TWO_RANK_RUN, ranks=2), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.1)


def assert_resumes_exactly(run: Path, shapes: Path, reference: dict[int, float]) -> None:
    resumed_from = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert resumed_from < 24, "the run finished before it could be interrupted"
    run_ok(train_cmd(run, shapes, *TWO_RANK_RUN, ranks=2, resume="latest"))
    after = {s: v for s, v in losses(run).items() if s > resumed_from}
    assert after == {s: reference[s] for s in after} and max(after) == 24


@pytest.mark.slow
def test_two_ranks_loss_falls(reference):
    assert reference[24] < reference[2]


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise(shapes, tmp_path, reference):
    run = tmp_path / "killed"
    proc = start_two_ranks(run, shapes)
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_resumes_exactly(run, shapes, reference)


@pytest.mark.slow
def test_preemption_signal_to_one_rank_checkpoints_and_exits_cleanly(shapes, tmp_path, reference):
    run = tmp_path / "preempted"
    proc = start_two_ranks(run, shapes)
    wait_for(lambda: len(losses(run)) >= 3 if (run / "metrics.jsonl").is_file() else False, proc)
    ranks = psutil.Process(proc.pid).children(recursive=False)[0].children(recursive=False)
    rank1 = next(p for p in ranks if "--local_rank=1" in " ".join(p.cmdline()))
    rank1.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    step = int((run / "PREEMPTED").read_text().strip().split("=")[1])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert_resumes_exactly(run, shapes, reference)
    assert not (run / "PREEMPTED").exists()


@pytest.mark.slow
def test_elastic_resume_on_one_rank_continues_the_same_samples(shapes, tmp_path, reference_run, reference):
    run = tmp_path / "elastic"
    proc = run_ok(train_cmd(run, shapes, *TWO_RANK_RUN, resume=str(reference_run / "checkpoints" / "step_00000016")))
    assert "elastic resume: saved on 2 ranks, running on 1" in proc.stderr
    after = losses(run)
    assert sorted(after) == list(range(17, 25))
    # Same weights, optimizer state and samples; only the reduction order differs between 1 and 2 ranks.
    for step, value in after.items():
        assert value == pytest.approx(reference[step], rel=1e-4), step


@pytest.mark.slow
def test_a_stage_0_checkpoint_resumes_on_another_world_size_as_it_is(shapes, tmp_path):
    """ZeRO stage 0 saves the optimizer state whole: a one-rank checkpoint continues on two ranks without DeepSpeed's
    universal conversion, on the same samples and updates as the uninterrupted one-rank run."""
    one_rank, two_ranks = tmp_path / "one", tmp_path / "two"
    run_ok(train_cmd(one_rank, shapes, *TWO_RANK_RUN, "train.zero_stage=0"))
    proc = run_ok(train_cmd(two_ranks, shapes, *TWO_RANK_RUN, "train.zero_stage=0", ranks=2,
                            resume=str(one_rank / "checkpoints" / "step_00000016")))
    assert "elastic resume: saved on 1 ranks, running on 2" in proc.stderr
    assert not list((one_rank / "checkpoints").glob("*_universal"))
    before, after = losses(one_rank), losses(two_ranks)
    assert sorted(after) == list(range(17, 25))
    for step, value in after.items():
        assert value == pytest.approx(before[step], rel=1e-4), step


@pytest.mark.slow
def test_resuming_a_partitioned_optimizer_at_stage_0_fails_in_one_line(shapes, tmp_path, reference_run):
    proc = subprocess.run(train_cmd(tmp_path / "run", shapes, *TWO_RANK_RUN, "train.zero_stage=0",
                                    resume=str(reference_run / "checkpoints" / "step_00000016")),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert len(lines) == 1 and "holds its optimizer state partitioned over its ranks" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_plain_clip_never_loads_the_teacher(shapes, tmp_path):
    run = tmp_path / "plain"
    # A teacher path that does not exist proves the teacher is never touched when its losses are off.
    run_ok(train_cmd(run, shapes, "train.steps=6", "loss.distill_weight=0", "loss.concept_weight=0",
                     "teacher.random_config=null", "teacher.path=/nonexistent/teacher.gguf"))
    last = read_metrics(run)[-1]
    assert "loss/distill" not in last and "teacher_tokens" not in last and last["loss/contrastive"] > 0


@pytest.mark.parametrize("override, key", [
    ("train.global_batch_size=15", "train.global_batch_size"),
    ("train.global_batch_size=0", "train.global_batch_size"),  # was a ZeroDivisionError traceback
    ("concepts.k=5000", "concepts.k"),
    ("teacher.path=/nonexistent/llama", "teacher.path"),
    ("train.stepz=3", "train.stepz"),
    ("loss.distill_kind=l1", "loss.distill_kind"),
    ("student.token_init=teacher", "student.token_init"),
    ("student.freeze_token_embeddings=true", "student.freeze_token_embeddings"),
])
def test_invalid_config_fails_before_any_process_group(shapes, tmp_path, monkeypatch, capsys, override, key):
    """In the process, as `kclip train` runs on rank 0 of two: starting a process group (or the ranks' launch) fails
    the test, so the one-line error proves validation came first."""
    import torch.distributed

    from kclip import dist
    from kclip.cli import main

    def start(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(dist, "init", start)
    monkeypatch.setattr(torch.distributed, "init_process_group", start)
    for var, value in dict(_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(var, value)
    assert main(train_cmd(tmp_path / "bad", shapes, override)[3:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kclip: error:") and key in lines[0], lines


def test_teacher_folder_without_weights_fails_before_any_process_group(shapes, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    proc = subprocess.run(train_cmd(tmp_path / "run", shapes, "teacher.random_config=null", f"teacher.path={folder}"), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"kclip: error: teacher.path: {folder} holds no weights" in proc.stderr


def test_gradient_accumulation_equals_the_full_batch(shapes, tmp_path):
    """With GradCache, 4 micro-batches of 4 give the losses of one batch of 16 in the default config: contrastive,
    batch-level (contrastive) distillation to whitened targets, and the concept terms once the bank is fitted after
    step 4. Activation checkpointing must not change the numbers. (tests/test_task.py compares every update.)"""
    common = ("train.steps=6", "log.every=1", "data.shuffle=false")
    full, accumulated = tmp_path / "full", tmp_path / "accum"
    run_ok(train_cmd(full, shapes, *common))
    run_ok(train_cmd(accumulated, shapes, *common, "train.micro_batch_size=4", "student.grad_checkpointing=true"))
    a, b = losses(full), losses(accumulated)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert "loss/concept" in read_metrics(accumulated)[-1]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


@pytest.mark.slow
def test_torchrun_launch(shapes, tmp_path):
    run = tmp_path / "torchrun"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "kclip.cli", "train", "--config",
           "smoke", "--output", str(run), f"data.train={shapes}", "train.steps=6", "dist.timeout_s=60"]
    run_ok(cmd)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"


def _printed_json(stdout: str) -> dict:
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.rstrip().endswith("{"))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("}"))
    return json.loads("\n".join([lines[start][lines[start].index("{"):], *lines[start + 1 : end + 1]]))


def test_teacher_cache_pass_makes_every_training_step_a_hit(shapes, tmp_path):
    run = tmp_path / "run"
    args = ["teacher-cache", "--config", "smoke", "--output", str(run), f"data.train={shapes}", "dist.timeout_s=60"]
    two_ranks = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "kclip.cli"]
    first = _printed_json(run_ok(two_ranks + args).stdout)
    assert first["filled"] == first["samples"] == 96 and first["computed"] >= 96
    again = _printed_json(run_ok([sys.executable, "-m", "kclip.cli", *args]).stdout)
    assert again["computed"] == 0 and again["already_cached"] == 96  # an interrupted pass resumes, a full one is free
    run_ok(train_cmd(run, shapes, "train.steps=4", "log.every=1"))
    rows = [r for r in read_metrics(run) if "teacher_tokens" in r]
    assert len(rows) == 4 and all(r["teacher_cache_hit_rate"] == 1.0 and r["teacher_tokens"] == 0 for r in rows)


def test_temperature_above_the_cap_is_clamped_and_can_come_down(shapes, tmp_path):
    """A student whose temperature is configured above CLIP's cap of 100 starts at the cap, and the gradient can lower
    it. Clamped inside the forward it would stay at exactly 100 for the whole run (zero gradient above the cap)."""
    run = tmp_path / "temperature"
    run_ok(train_cmd(run, shapes, "train.steps=12", "log.every=1", "loss.distill_weight=0", "loss.concept_weight=0",
                     "optim.warmup_steps=0", "optim.lr=0.01", f"student.init_logit_scale={math.log(100.0) + 0.5}"))
    scales = [row["logit_scale"] for row in read_metrics(run) if "logit_scale" in row]
    assert max(scales) <= 100.0 + 1e-3
    assert scales[-1] < 99.0, scales  # the random-init contrastive loss asks for a softer temperature
