"""Every shipped config, at every ZeRO stage, on 1 and 2 ranks: a run trained as shipped (shrunk only in steps and
data) is read by every reader the project offers, and they all agree on its embeddings: `kclip export`, `kclip eval`
on the run and on the export, `kclip.load` of both, open_clip's `local-dir:` form, and `kclip export-wds` with the
stock clip_benchmark command line.

The reference is the checkpoint's own module state, loaded as it is into the student (these runs train in fp32, so it
is the master copy): a reader that reassembles ZeRO partitions, or skips them at stage 0, must reproduce it.

A config or a stage gets its row by being added to CONFIGS or STAGES; a config file added to kclip/configs without a
row fails `test_every_shipped_config_has_a_row`.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evalruns import single_thread
from multiproc import run_ranks
from shapes import make_shapes_mds
from test_export_open_clip import compare_with_open_clip, rgb_image
from test_export_wds import labelled_split
from test_hf_clip_student import tiny_clip
from test_teacher import TINY_LLAMA, real_teacher_path

import kclip
from kclip.config import load_config
from kclip.config.files import resolve_config_path
from kclip.eval.run import main as eval_main
from kclip.eval.wds import RETRIEVAL
from kclip.eval.wds import main as wds_main
from kclip.export.format import MODEL_STATES
from kclip.export.open_clip import OPEN_CLIP_CONFIG
from kclip.export.load import load_model
from kclip.export.save import main as export_main
from kclip.tokenizers import load_tokenizer
from kclip.train import checkpoint

CONFIGS = ["smoke", "demo", "cc3m-llama2-7b-vitb16"]
STAGES = [0, 1, 2]
RANKS = [1, 2]
ROWS = list(itertools.product(CONFIGS, STAGES, RANKS))

# Steps, and the harness's short collective timeout: nothing that changes what a step computes.
SHRINK = ["train.steps=2", "checkpoint.every=2", "log.every=1", "log.tensorboard=false", "dist.timeout_s=60"]
TEXTS = ["a red circle", "a blue square", "something else entirely " * 20]
ATOL = 1e-5


def local_substitutes(name: str, root: Path) -> list[str]:
    """What each config needs beyond steps and data on this machine. The cluster config names a CLIP ViT-B/16, a
    Llama-2-7B and a global batch of 4096: here a random CLIP folder at the same 224-pixel input, a random Llama
    folder with the teacher's tokenizer, and a batch this data holds; its workers are this machine's two cores."""
    if name == "demo":
        return [f"teacher.path={real_teacher_path()}"]
    if name != "cc3m-llama2-7b-vitb16":
        return []
    clip, llama = root / "clip-vit", root / "llama"
    if not clip.is_dir():
        tiny_clip(clip, vision={"image_size": 224, "patch_size": 32}, max_position_embeddings=77)
        from transformers import LlamaConfig, LlamaModel

        LlamaModel(LlamaConfig(**TINY_LLAMA)).save_pretrained(llama)
        load_tokenizer("byte").save_pretrained(llama)
    return [f"student.hf_clip={clip}", f"student.tokenizer={clip}", f"teacher.path={llama}",
            "train.global_batch_size=8", "data.num_workers=1"]


def row_overrides(name: str, stage: int, root: Path, data: Path, val: Path) -> list[str]:
    return [*SHRINK, f"train.zero_stage={stage}", f"data.train={data}", f"data.val={val}",
            *local_substitutes(name, root)]


def row_id(row) -> str:
    name, stage, ranks = row
    return f"{name}-zero{stage}-{ranks}rank"


def _train_rows(rows: list[tuple[str, list[str], str]]) -> None:
    """On every rank of one process group: train each row in turn (one launch pays for all of them)."""
    from kclip.train.loop import train

    for name, overrides, run in rows:
        train(load_config(name, overrides), run)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """{row: run folder} for every row, each exported to RUN/../export."""
    root = tmp_path_factory.mktemp("matrix")
    data, val = make_shapes_mds(root / "shapes", n=64), labelled_split(root / "val")
    runs, by_ranks = {}, {1: [], 2: []}
    for row in ROWS:
        name, stage, ranks = row
        runs[row] = root / row_id(row) / "run"
        by_ranks[ranks].append((name, row_overrides(name, stage, root, data, val), str(runs[row])))
    with single_thread():
        _train_rows(by_ranks[1])
    run_ranks(_train_rows, by_ranks[2], timeout=900, env={"OMP_NUM_THREADS": "1"})
    for run in runs.values():
        assert export_main([str(run), str(run.parent / "export")]) == 0
        kclip_eval(run.parent / "export", val, run.parent / "export_eval.json")
    return {"runs": runs, "val": val}


def kclip_eval(source: Path, val: Path, out: Path) -> dict:
    with single_thread():
        assert eval_main(["--checkpoint", str(source), "--data", str(val), "--label-cols", "kind",
                          "--skip", "linear,knn,caption_em", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def reference(run: Path):
    """The student with the checkpoint's module state loaded as it is, and the tokenizer and preprocessing kclip
    reads for the run."""
    loaded = load_model(run)
    tag = checkpoint.resolve(run, "latest")
    module = torch.load(tag / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    model = copy.deepcopy(loaded.model)
    model.student.load_state_dict({k[len("student."):]: v for k, v in module.items() if k.startswith("student.")})
    return model, loaded


def embeddings(model, tokenizer, pixels) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode_image(pixels), model.encode_text(**tokenizer(TEXTS))])


def test_every_shipped_config_has_a_row():
    shipped = sorted(p.stem for p in resolve_config_path("smoke").parent.glob("*.yaml"))
    assert sorted(CONFIGS) == shipped


@pytest.mark.slow
@pytest.mark.teacher_file
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_every_reader_agrees_on_the_runs_embeddings(matrix, row, tmp_path):
    run = matrix["runs"][row]
    export = run.parent / "export"
    ref_model, loaded = reference(run)
    assert loaded.cfg.train.zero_stage == row[1] and checkpoint.optimizer_partitioned(
        checkpoint.resolve(run, "latest")) == (row[1] > 0)
    model, tokenizer, preprocess = kclip.load(run)
    pixels = preprocess(rgb_image())[None]
    expected = embeddings(ref_model, tokenizer, pixels)
    for source in (run, export):
        model, tokenizer, preprocess = kclip.load(source)
        assert torch.equal(preprocess(rgb_image())[None], pixels)
        torch.testing.assert_close(embeddings(model, tokenizer, pixels), expected, atol=ATOL, rtol=0)
    # open_clip's own model from the export embeds as kclip.load(export) does
    assert (export / OPEN_CLIP_CONFIG).is_file()
    diff = compare_with_open_clip(export)
    assert max(diff.values()) < ATOL, diff
    # kclip eval scores the run as its export
    ours = kclip_eval(run, matrix["val"], tmp_path / "run_eval.json")
    of_export = json.loads((run.parent / "export_eval.json").read_text())
    numbers = {k: v for k, v in ours.items() if isinstance(v, float)}
    assert "retrieval/i2t_R@1" in numbers and numbers == pytest.approx({k: of_export[k] for k in numbers}, abs=1e-6)


# clip_benchmark's own command line over every row's export in one process (its imports take most of the time).
CLIP_BENCHMARK = """
import json, sys
from clip_benchmark.cli import main
root, exports = sys.argv[1], json.loads(sys.argv[2])
for export in exports:
    for dataset, task in (("kind", "zeroshot_classification"), ("retrieval", "zeroshot_retrieval")):
        sys.argv = ["clip_benchmark", "eval", "--model", f"local-dir:{export}", "--dataset", f"wds/{dataset}",
                    "--dataset_root", root + "/{dataset}", "--task", task, "--no_amp", "--num_workers", "0",
                    "--recall_k", "1", "5", "10", "--output", export + f"/../clip_benchmark_{dataset}.json", "--quiet"]
        main()
"""


@pytest.mark.slow
@pytest.mark.teacher_file
def test_clip_benchmark_scores_every_rows_export_as_kclip_eval(matrix, tmp_path):
    wds = tmp_path / "wds"
    assert wds_main(["--data", str(matrix["val"]), "--out", str(wds), "--label-cols", "kind"]) == 0
    exports = [str(run.parent / "export") for run in matrix["runs"].values()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CLIP_BENCHMARK, str(wds), json.dumps(exports)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row, run in matrix["runs"].items():
        kclip_numbers = json.loads((run.parent / "export_eval.json").read_text())
        zeroshot, retrieval = (json.loads((run.parent / f"clip_benchmark_{d}.json").read_text())["metrics"]
                               for d in ("kind", RETRIEVAL))
        assert zeroshot == pytest.approx({"acc1": kclip_numbers["zeroshot/kind/top1"],
                                          "acc5": kclip_numbers["zeroshot/kind/top5"],
                                          "mean_per_class_recall": kclip_numbers["zeroshot/kind/mean_per_class"]},
                                         abs=1e-6), row_id(row)
        assert retrieval == pytest.approx({f"{name}@{k}": kclip_numbers[f"retrieval/{way}_R@{k}"] for k in (1, 5, 10)
                                           for name, way in (("image_retrieval_recall", "t2i"),
                                                             ("text_retrieval_recall", "i2t"))},
                                          abs=1e-6), row_id(row)

