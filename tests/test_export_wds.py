"""`kclip export-wds` + the stock clip_benchmark on `kclip export`'s open_clip form score a trained student exactly as
`kclip eval` does: zero-shot top-1, top-5 and mean per-class recall, and retrieval recall@1/5/10 both ways."""
from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys

import pytest
from evalruns import single_thread, tiny_runs
from shapes import COLORS, SHAPES, draw

from kclip.data.cli import prepare_main
from kclip.eval.run import main as eval_main
from kclip.eval.wds import RETRIEVAL, SPLIT
from kclip.eval.wds import main as wds_main
from kclip.export.save import main as export_main

# clip_benchmark's own command line, once per task in one process (its imports take most of the time), with its
# default data workers. --no_amp: its default mixed precision computes in bfloat16 on a CPU, kclip eval in float32.
CLIP_BENCHMARK = """
import sys
from clip_benchmark.cli import main
model, root, results = sys.argv[1:4]
for dataset, task in (("kind", "zeroshot_classification"), ("retrieval", "zeroshot_retrieval")):
    sys.argv = ["clip_benchmark", "eval", "--model", f"local-dir:{model}", "--dataset", f"wds/{dataset}",
                "--dataset_root", root + "/{dataset}", "--task", task, "--no_amp",
                "--recall_k", "1", "5", "10", "--output", results + "/{dataset}.json", "--quiet"]
    main()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with single_thread():
        yield tiny_runs(tmp_path_factory)


def labelled_split(root, n: int = 24):
    """n shape images, each caption a different text (kclip's retrieval merges identical captions, clip_benchmark's
    does not), label `kind` = colour and shape: 12 classes, so clip_benchmark reports top-5 too (from 5 classes)."""
    (root / "raw").mkdir(parents=True)
    rows = []
    for i, (color, shape) in zip(range(n), itertools.cycle(itertools.product(COLORS, SHAPES))):
        draw(color, shape, i).save(root / "raw" / f"{i}.png")
        rows.append({"filepath": f"{i}.png", "title": f"a {color} {shape}, picture {i}", "kind": f"{color}_{shape}"})
    with open(root / "raw" / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert prepare_main(["csv", "--src", str(root / "raw" / "pairs.csv"), "--out", str(root / "mds"),
                         "--label-cols", "kind", "--workers", "1"]) == 0
    return root / "mds"


def test_clip_benchmark_on_the_export_scores_as_kclip_eval(runs, tmp_path):
    data, export, wds = labelled_split(tmp_path / "split"), tmp_path / "export", tmp_path / "wds"
    assert export_main([str(runs["plain"]), str(export)]) == 0
    assert wds_main(["--data", str(data), "--out", str(wds), "--label-cols", "kind"]) == 0
    assert (wds / RETRIEVAL / "dataset_type.txt").read_text() == "retrieval\n"
    # 24 images in 12 shards: enough for clip_benchmark's 4 default data workers, which this run uses
    assert (wds / "kind" / SPLIT / "nshards.txt").read_text() == "12\n"
    assert (wds / "kind" / "classnames.txt").read_text().splitlines()[:2] == ["blue circle", "blue square"]

    with single_thread():
        assert eval_main(["--checkpoint", str(export), "--data", str(data), "--label-cols", "kind",
                          "--skip", "linear,knn,caption_em", "--out", str(tmp_path / "kclip.json")]) == 0
    kclip = json.loads((tmp_path / "kclip.json").read_text())
    (tmp_path / "results").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CLIP_BENCHMARK, str(export), str(wds), str(tmp_path / "results")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zeroshot, retrieval = (json.loads((tmp_path / "results" / f"{d}.json").read_text())["metrics"]
                           for d in ("kind", RETRIEVAL))

    expected = {"acc1": kclip["zeroshot/kind/top1"], "acc5": kclip["zeroshot/kind/top5"],
                "mean_per_class_recall": kclip["zeroshot/kind/mean_per_class"]}
    assert zeroshot == pytest.approx(expected, abs=1e-6)
    expected = {f"{name}@{k}": kclip[f"retrieval/{way}_R@{k}"] for k in (1, 5, 10)
                for name, way in (("image_retrieval_recall", "t2i"), ("text_retrieval_recall", "i2t"))}
    assert retrieval == pytest.approx(expected, abs=1e-6)
    # Not a comparison of two blind models: the trained student ranks better than chance somewhere.
    assert max(expected.values()) > 10 / 24


def test_export_wds_mistakes_are_one_line_and_leave_nothing(tmp_path, capsys):
    data, out = labelled_split(tmp_path / "split", n=3), tmp_path / "wds"
    for args, message in ((["--data", str(tmp_path / "none")], "--data: not an MDS folder"),
                          (["--data", str(data), "--label-cols", "colour"], "--label-cols: "),
                          (["--data", str(data), "--label-cols", RETRIEVAL], "--label-cols: a column named")):
        assert wds_main([*args, "--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"kclip export-wds: error: {message}"), lines
        assert not out.exists() and not out.with_name("wds.tmp").exists()
