"""benchmarks/quality_study.py: its statistics on known numbers, its resume planning over run folders, and one tiny
study end to end (smoke config, plain CLIP and distillation, 2 seeds, 3 steps)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats
from shapes import make_shapes_mds

from kclip.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality_study as qs  # noqa: E402


def test_describe_uses_the_sample_std():
    assert qs.describe([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert qs.describe([0.5]) == {"mean": 0.5, "std": None, "n": 1}


def test_paired_t_test_p_values_match_the_t_tables():
    # Two-sided 5% critical values of Student's t from the tables: 4.303 (2 df), 2.776 (4 df), 2.262 (9 df). "Beyond
    # 2 SE" is the normal's 1.96, right only for many seeds.
    assert qs.paired_t_p(4.303, 2) == pytest.approx(0.05, abs=1e-4)
    assert qs.paired_t_p(-2.776, 4) == pytest.approx(0.05, abs=1e-4)
    assert qs.paired_t_p(2.262, 9) == pytest.approx(0.05, abs=1e-4)
    # 2 SE is not 5% at few degrees of freedom: t = 3.46 at 2 df (three seeds) is p = 0.074.
    assert qs.paired_t_p(3.46, 2) == pytest.approx(0.0743, abs=1e-4)
    assert qs.paired_t_p(0.0, 3) == 1.0


def test_paired_difference_over_the_common_seeds():
    variant = {0: 0.5, 1: 0.7, 2: 0.9}
    plain = {0: 0.4, 1: 0.5, 2: 0.6, 3: 0.9}  # seed 3 has no partner: left out of the mean, the SE and the ratio
    p = qs.paired_difference(variant, plain)
    assert p["n"] == 3 and p["df"] == 2
    assert p["mean_diff"] == pytest.approx(0.2)  # d = 0.1, 0.2, 0.3
    assert p["se"] == pytest.approx(0.1 / math.sqrt(3))  # std(d, ddof=1) = 0.1
    assert p["t"] == pytest.approx(2 * math.sqrt(3))  # 3.46: beyond 2 SE, yet
    assert p["p"] == pytest.approx(0.0742, abs=1e-4)  # not below 5% with 2 degrees of freedom
    assert p["ratio"] == pytest.approx(0.7 / 0.5)
    assert not p["headline"] and "significant" not in p  # 3 seeds, and nothing claims a finding
    assert qs.paired_cell(p) == "+0.200 ± 0.058 (1.40x) p=0.074 †"


def test_five_seeds_make_a_headline_number():
    # d = 0.1, 0.2, 0.3, 0.4, 0.5: mean 0.3, std(ddof=1) sqrt(0.025), t = 0.3 / (sqrt(0.025) / sqrt(5)) = 4.243 at 4 df.
    plain = {s: 0.5 for s in range(5)}
    p = qs.paired_difference({s: 0.5 + 0.1 * (s + 1) for s in range(5)}, plain)
    assert p["n"] == 5 and p["df"] == 4 and p["headline"]
    assert p["t"] == pytest.approx(0.3 / math.sqrt(0.025 / 5))
    assert p["p"] == pytest.approx(0.01324, abs=1e-4)
    assert qs.paired_cell(p) == "+0.300 ± 0.071 (1.60x) p=0.013"


def test_paired_difference_without_spread_or_partner_has_no_test():
    p = qs.paired_difference({0: 0.5, 1: 0.4}, {0: 0.4, 1: 0.5})  # d = +0.1, -0.1
    assert p["mean_diff"] == pytest.approx(0.0) and p["se"] == pytest.approx(0.1) and p["p"] == pytest.approx(1.0)
    single = qs.paired_difference({0: 0.5}, {0: 0.4})
    assert single["se"] is None and single["t"] is None and single["p"] is None and not single["headline"]
    same = qs.paired_difference({0: 454.0, 1: 454.0}, {0: 454.0, 1: 454.0})  # e.g. num_samples: t is 0 / 0
    assert same["se"] == 0.0 and same["t"] is None and same["p"] is None


def test_pairing_cancels_the_noise_both_variants_share():
    # Seeds move both variants together: the means' stds are large, the paired differences' SE is small.
    plain = {0: 0.10, 1: 0.30, 2: 0.50, 3: 0.70, 4: 0.90}
    variant = {s: v + d for (s, v), d in zip(plain.items(), (0.02, 0.01, 0.03, 0.02, 0.02))}
    assert qs.describe(list(plain.values()))["std"] == pytest.approx(math.sqrt(0.1))
    p = qs.paired_difference(variant, plain)
    assert p["se"] == pytest.approx(math.sqrt(0.00005 / 5))  # std(d, ddof=1)^2 = 0.0002 / 4
    reference = stats.ttest_rel(list(variant.values()), list(plain.values()))
    assert (p["t"], p["p"]) == pytest.approx((reference.statistic, reference.pvalue)) and p["p"] < 0.01
    # Unpaired, the same numbers say nothing: the seed-to-seed spread swamps the difference.
    assert stats.ttest_ind(list(variant.values()), list(plain.values())).pvalue > 0.9


def test_run_metrics_keeps_numbers_and_adds_mean_recall():
    raw = {"retrieval/i2t_R@10": 0.2, "retrieval/t2i_R@10": 0.1, "retrieval/i2t_R@1": 0.02, "retrieval/t2i_R@1": 0.04,
           "num_samples": 454, "protocol/retrieval": "positives: ...", "protocol/checkpoint": "runs/x"}
    m = qs.run_metrics(raw)
    assert m["retrieval/mean_R@10"] == pytest.approx(0.15) and m["retrieval/mean_R@1"] == pytest.approx(0.03)
    assert m["num_samples"] == 454.0 and not any(k.startswith("protocol/") for k in m)


def test_summarize_compares_every_variant_with_the_baseline():
    runs = {"plain": {0: {"a": 1.0, "b": 5.0}, 1: {"a": 2.0, "b": 6.0}},
            "x": {0: {"a": 2.0, "only_x": 1.0}, 1: {"a": 4.0, "only_x": 2.0}}}
    summary, paired = qs.summarize(runs, "plain")
    assert summary["plain"]["a"] == {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}
    assert set(paired) == {"x"}
    assert set(paired["x"]) == {"a"}  # only_x has no baseline to compare with
    assert paired["x"]["a"]["mean_diff"] == pytest.approx(1.5) and paired["x"]["a"]["ratio"] == pytest.approx(2.0)


def test_key_metrics_follow_the_label_columns_and_what_runs_have():
    present = {"retrieval/mean_R@10", "retrieval/i2t_R@1", "zeroshot/shape/top1", "probe/linear/shape/top1",
               "probe/linear/shape/top5"}
    assert qs.key_metrics(["color", "shape"], present) == [
        "retrieval/mean_R@10", "retrieval/i2t_R@1", "zeroshot/shape/top1", "probe/linear/shape/top1"]


@pytest.fixture
def smoke_cfg():
    return load_config("smoke", ["train.steps=3", "loss.concept_weight=0"])


def test_next_action_reads_the_run_folder(tmp_path, smoke_cfg):
    run = tmp_path / "run"
    assert qs.next_action(run, smoke_cfg) == "train"  # nothing yet
    (run / "checkpoints").mkdir(parents=True)
    save_config(smoke_cfg, run / "config.yaml")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    assert qs.next_action(run, smoke_cfg) == "train"  # half trained: resumed
    (run / "checkpoints" / "latest").write_text("step_00000003")
    assert qs.next_action(run, smoke_cfg) == "evaluate"  # trained, not evaluated
    (run / "eval.json").write_text("{}")
    assert qs.next_action(run, smoke_cfg) == "done"


def test_next_action_refuses_a_run_trained_with_other_settings(tmp_path, smoke_cfg):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("smoke", ["train.steps=3", "loss.concept_weight=0", "log.every=1"]), run / "config.yaml")
    assert qs.next_action(run, smoke_cfg) == "train"  # logging does not change what a run learns
    save_config(load_config("smoke", ["train.steps=5", "loss.concept_weight=0"]), run / "config.yaml")
    with pytest.raises(qs.StudyError, match="train.steps"):
        qs.next_action(run, smoke_cfg)


def test_a_variant_with_an_unknown_key_fails_before_any_run(tmp_path):
    with pytest.raises(qs.StudyError, match="variant typo: loss.distill_wieght"):
        qs.make_runs("smoke", {"typo": ["loss.distill_wieght=0"]}, [0], tmp_path, [])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=24)


def study_cmd(out: Path, data: Path, *extra: str) -> list[str]:
    """Plain CLIP and cosine distillation (keys every checkout has) on the smoke config, 2 seeds x 3 steps."""
    return [sys.executable, str(REPO / "benchmarks" / "quality_study.py"), "--out", str(out), "--config", "smoke",
            "--seeds", "0", "1", "--steps", "3", "--label-cols", "color,shape",
            "--define", "distill_cosine", "loss.concept_weight=0", "loss.distill_kind=cosine",
            "--variants", "distill_cosine",
            "--overrides", f"data.train={data}", f"data.val={data}", "log.tensorboard=false", "eval.batch_size=8",
            *extra]


def run_study(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, shapes):
    out = tmp_path / "study"
    text = run_study(study_cmd(out, shapes, "--dry-run", "--precompute-teacher"))
    assert "4 runs (2 variants x 2 seeds, 3 steps of smoke): 4 to train" in text
    assert text.count(" train: ") == 4 and text.count(" eval: ") == 4
    assert "teacher-cache (distill_cosine)" in text  # plain needs no teacher: one fill, for the one teacher setting
    assert f"train.seed=1 teacher.cache_dir={out}/teacher_cache loss.concept_weight=0 loss.distill_kind=cosine" in text
    assert not out.exists()


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumed(tmp_path, shapes):
    out = tmp_path / "study"
    text = run_study(study_cmd(out, shapes))
    assert "[4/4]" in text and "FAILED" not in text
    study = json.loads((out / "study.json").read_text())
    assert set(study["runs"]) == {"plain", "distill_cosine"}
    assert all(set(seeds) == {"0", "1"} for seeds in study["runs"].values())
    paired = study["paired"]["distill_cosine"]["retrieval/mean_R@10"]
    assert paired["n"] == 2 and paired["se"] is not None and paired["ratio"] is not None and not paired["headline"]
    assert study["summary"]["plain"]["probe/linear/shape/top1"]["n"] == 2
    md = (out / "study.md").read_text()
    assert "Paired difference to plain" in md and "| distill_cosine |" in md and "--variants distill_cosine" in md
    assert "†" in md and "* marks" not in md
    assert (out / "retrieval_mean_R@10.png").stat().st_size > 0
    # Both distillation seeds read one shared cache folder (one teacher setting, one dataset).
    assert len(list((out / "teacher_cache").iterdir())) == 1

    # Resumed: finished runs are skipped; a trained but unevaluated run is only evaluated.
    (out / "plain" / "seed1" / "eval.json").unlink()
    train_log = (out / "plain" / "seed1" / "train.log").read_text()
    text = run_study(study_cmd(out, shapes))
    assert "0 to train, 1 to evaluate on val, 3 done" in text and "plain seed1: evaluated" in text
    assert (out / "plain" / "seed1" / "train.log").read_text() == train_log
    assert json.loads((out / "study.json").read_text())["paired"]["distill_cosine"]["retrieval/mean_R@10"]["n"] == 2
