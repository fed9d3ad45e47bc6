"""`kclip report` over two tiny runs (Knowledge-CLIP and plain CLIP): every plot, the side-by-side table, the PCA
concept map for the run with a teacher and concept bank, and a note for the run without."""
from __future__ import annotations

import json

import pytest
from evalruns import single_thread, tiny_runs
from PIL import Image

from kclip.report import main

PNGS = ("losses.png", "lr.png", "logit_scale.png", "throughput.png", "concepts.png", "eval.png", "concept_map_kc.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with single_thread():
        yield tiny_runs(tmp_path_factory)


def test_report_over_two_runs(runs, tmp_path):
    (runs["plain"] / "eval.json").write_text(json.dumps({"zeroshot/color/top1": 0.5, "protocol/x": "text"}))
    out = tmp_path / "report"
    assert main([str(runs["kc"]), str(runs["plain"]), "--out", str(out), "--concept-map-samples", "50"]) == 0
    for name in PNGS:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 200
    md = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ")}
    assert rows["metric"] == ["kc", "plain"]
    assert all(float(v) > 0 for v in rows["loss/contrastive"])
    assert float(rows["loss/distill"][0]) > 0 and rows["loss/distill"][1] == "–"  # plain CLIP has no distillation
    assert rows["eval/num_samples"] == ["24", "24"]
    assert rows["zeroshot/color/top1"] == ["–", "0.5"] and "protocol/x" not in rows
    assert all(f"]({name})" in md for name in PNGS)
    assert "plain: no concept map (the run has no teacher" in md and "kc: concept map from checkpoint step_00000004" in md


def test_report_rejects_a_folder_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
