"""The performance benchmarks' own logic: step classification and schedules, log parsing, the scaling arithmetic, and
the GPU benchmark's CPU-side paths (refusal without a GPU, argument checks, a --dry-run with tiny models)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_throughput
import scaling_table
import step_breakdown
import vs_open_clip
from common import wall_ms_per_step


def test_fit_steps_follow_the_trainers_schedule():
    from kclip.config import Config
    from kclip.train.task import concept_fit_due

    for warmup, every, steps in [(10, 50, 200), (20, 1000, 12200), (4, 10, 30), (5, 0, 40)]:
        cfg = Config()
        cfg.concepts.warmup_steps, cfg.concepts.recompute_every = warmup, every
        expected = [s + 1 for s in range(steps) if concept_fit_due(s, cfg)]
        assert step_breakdown.fit_steps(steps, warmup, every) == expected


def _row(step, time, hit_rate=None, samples_total=None, **extra):
    row = {"step": step, "time": time, "data_ms": 1.0, "teacher_ms": 2.0, "student_ms": 3.0,
           "count/samples": samples_total if samples_total is not None else 4 * step, "samples_per_s": 1.0, **extra}
    if hit_rate is not None:
        row["teacher_cache_hit_rate"] = hit_rate
    return row


def test_per_step_classifies_cache_hits_from_the_cumulative_rate():
    # batch 4: step 1 no hits, step 2 all 4 hit, step 3 one hit -> cumulative 0/4, 4/8, 5/12
    rows = [_row(1, 100.0, 0.0), _row(2, 100.5, 0.5), _row(3, 101.25, 5 / 12, **{"concepts/seconds": 0.2})]
    steps = step_breakdown.per_step(rows)
    assert [s["kind"] for s in steps] == ["cold", "warm", "mixed"]
    assert [s["hits"] for s in steps] == [0, 4, 1]
    assert steps[0]["wall_ms"] is None and steps[1]["wall_ms"] == pytest.approx(500.0)
    assert steps[2]["wall_ms"] == pytest.approx(750.0) and steps[2]["kmeans_s"] == 0.2
    assert [s["kind"] for s in step_breakdown.per_step([_row(1, 1.0), _row(2, 2.0)])] == ["plain", "plain"]


def test_wall_time_needs_consecutive_steps():
    assert wall_ms_per_step([_row(10, 1.0), _row(20, 2.0), _row(21, 2.5)]) == {21: pytest.approx(500.0)}


def test_open_clip_log_lines_are_parsed(tmp_path):
    log = tmp_path / "out.log"
    log.write_text(
        "2026-11-28,13:25:36 | INFO | Train Epoch: 0 [ 64/512 (12%)] Data (t): 0.169 Batch (t): 1.372, 46.6549/s, "
        "46.6549/s/gpu LR: 0.000050 Logit Scale: 14.286 Contrastive_loss: 4.4229 (4.4229) Loss: 4.4229 (4.4229)\n"
        "2026-11-28,13:25:36 | INFO | Start epoch 0\n"
        "2026-11-28,13:25:37 | INFO | Train Epoch: 0 [128/512 (25%)] Data (t): 0.008 Batch (t): 0.961, 66.6/s\n")
    steps = vs_open_clip.open_clip_steps(log)
    assert [(s["step"], s["data_ms"], s["wall_ms"]) for s in steps] == [(1, 169.0, 1372.0), (2, 8.0, 961.0)]


def test_scaling_arithmetic_shards_and_offload():
    shape = scaling_table.teacher_shape("7B")
    assert shape["params"] == 6_607_343_616  # Llama-2-7B without the LM head
    assert shape["largest_tensor"] == 32000 * 4096  # the embedding
    student = scaling_table.student_shape()
    a = dict(scaling_table.ASSUMED, computed_per_real_token=1.0)
    one, eight = (scaling_table.row("7B", shape, student, n, "zero3", 4096, 256, 77, a) for n in (1, 8))
    gib = 2**30
    assert one["mem_gib"]["teacher_shard"] == pytest.approx(2 * shape["params"] / 8 / gib)
    assert eight["mem_gib"]["teacher_shard"] == pytest.approx(one["mem_gib"]["teacher_shard"] / 8)
    assert one["prefetch_bucket"] == int(0.9 * 4096 * 4096)  # from kclip.teacher.load.teacher_ds_config
    # Packed rows: 512 captions x 15 tokens fit in 256 rows of 77 tokens, so one forward (one all-gather) per step.
    assert one["teacher_forward"]["forwards"] == 1
    off = scaling_table.row("7B", shape, student, 2, "zero3+cpu", 4096, 256, 77, a)
    assert off["mem_gib"]["teacher_shard"] == 0 and off["host_gib_per_node"] == pytest.approx(2 * shape["params"] / 2 / gib)
    # The whole teacher is all-gathered per forward whatever the world size; across nodes the network is the limit.
    assert eight["teacher_forward"]["comm_s"] > one["teacher_forward"]["comm_s"]
    assert eight["samples_per_s"]["warm"] > one["samples_per_s"]["warm"] > one["samples_per_s"]["cold"]
    # teacher.shard_within=node, a copy per node: the shard is 1/8 of the teacher and the all-gather runs over NVLink
    # at any node count; offloaded, every node's host holds a whole copy.
    node = scaling_table.row("7B", shape, student, 8, "zero3-node", 4096, 256, 77, a)
    assert node["mem_gib"]["teacher_shard"] == pytest.approx(one["mem_gib"]["teacher_shard"])
    assert node["teacher_forward"]["comm_s"] == pytest.approx(one["teacher_forward"]["comm_s"])
    node_off = scaling_table.row("7B", shape, student, 8, "zero3-node+cpu", 4096, 256, 77, a)
    assert node_off["mem_gib"]["teacher_shard"] == 0
    assert node_off["host_gib_per_node"] == pytest.approx(2 * shape["params"] / gib)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed when no GPU is present")
def test_gpu_benchmark_refuses_without_gpu(capsys):
    assert gpu_throughput.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_benchmark_argument_checks():
    args = gpu_throughput.parse_args([])
    assert (args.batch, args.chunk, args.json) == (256, 256, str(REPO / "benchmarks" / "results" / "gpu_throughput.json"))
    assert gpu_throughput.parse_args(["--dry-run"]).json is None
    for bad in (["--batch", "50"], ["--steps", "0"], ["--mean-tokens", "0"]):
        with pytest.raises(SystemExit):
            gpu_throughput.parse_args(bad)
    assert gpu_throughput.peak_tflops("NVIDIA H200") == 989.0 and gpu_throughput.peak_tflops("Tesla T4") is None


def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    """The whole measured path (teacher embed, concept fit, student engine step, FLOP accounting) with tiny models."""
    out = tmp_path / "dry.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--dry-run", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"] == "cpu" and r["timed_steps"] == 2
    assert r["teacher"]["real_tokens_per_step"] <= r["teacher"]["computed_tokens_per_step"] <= 8 * 16
    assert r["student"]["samples_per_s"] > 0 and r["cold_step"]["samples_per_s"] < r["warm_step_samples_per_s"]
    assert r["teacher"]["mfu"] is None  # no peak is known for a CPU
    assert r["student"]["image_tokens"] == (32 // 8) ** 2 + 1


def test_grad_cache_benchmark_on_the_smoke_config(tmp_path):
    """The three variants (big batch, GradCache, plain accumulation) run side by side and report time and memory."""
    out = tmp_path / "gc.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    # 3 timed steps: their median is neither their mean nor the first or last step.
    proc = subprocess.run([sys.executable, "benchmarks/grad_cache.py", "--config", "smoke", "--batch", "16", "--micro",
                           "4", "--iters", "3", "--teacher-dim", "48", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["medians"]) == set(r["seconds"]) == {"big batch", "GradCache", "plain accum"}
    assert all(len(v) == 3 for v in r["seconds"].values())
    # Seconds, and timed inside the run: all timed steps together fit in its wall time.
    assert 0 < sum(map(sum, r["seconds"].values())) < r["total_s"]
    # Every reported number is the named variant's median, against the big batch's median.
    big = statistics.median(r["seconds"]["big batch"])
    for name, row in r["medians"].items():
        assert row["ms_per_step"] == pytest.approx(1000 * statistics.median(r["seconds"][name]))
        assert row["x_big_batch"] == pytest.approx(statistics.median(r["seconds"][name]) / big)
        assert row["peak_mib"] == pytest.approx(statistics.median(r["peak_mib"][name]))
    assert r["gradcache_over_big"] == pytest.approx(statistics.median(r["seconds"]["GradCache"]) / big)
    # The ratio in the headline line is that one, not another variant's.
    assert f"GradCache / big batch: {r['gradcache_over_big']:.2f}x" in proc.stdout
