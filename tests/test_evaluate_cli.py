"""`kclip eval` on tiny trained runs: embeddings gathered once per sample, every documented key written, the
checkpoint read back exactly (same retrieval numbers as the training loop's own evaluation), the teacher kNN probe of
a plain-CLIP run given a teacher, and 2-rank evaluation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from evalruns import COMMON, single_thread, tiny_runs
from multiproc import run_ranks
from transformers import LlamaConfig, LlamaModel

from kclip.config import load_config
from kclip.eval.run import eval_loader, evaluate, main
from kclip.eval.teacher import teacher_config
from kclip.retrieval.split import embed_split
from kclip.export.load import load_model
from kclip.train.loop import train
from kclip.tokenizers import load_tokenizer
from kclip.train.metrics import read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with single_thread():
        yield tiny_runs(tmp_path_factory)


def test_embed_split_sees_every_sample_once_with_keys_labels_and_captions(runs):
    loaded = load_model(runs["kc"])
    # 24 samples in batches of 16: the ragged last batch must not be dropped.
    emb = embed_split(loaded.model, eval_loader(str(runs["data"]), loaded, 16, ("color", "shape"), 0), loaded.device)
    assert emb["index"].tolist() == list(range(24))
    captions = emb["caption"]
    assert all(c == f"a {col} {shape}" for c, col, shape in zip(captions, emb["labels"]["color"], emb["labels"]["shape"]))
    same_text = [[a == b for b in captions] for a in captions]
    same_key = (emb["text_key"][:, None] == emb["text_key"][None, :]).tolist()
    assert same_key == same_text and len(set(emb["image_key"].tolist())) == 24


def test_eval_cli_writes_documented_keys_and_matches_training_eval(runs, tmp_path):
    out = tmp_path / "metrics.json"
    rc = main(["--checkpoint", str(runs["kc"]), "--data", str(runs["data"]), "--label-cols", "color,shape",
               "--out", str(out), "--batch-size", "8", "--em-steps", "20", "--knn-k", "3"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["num_samples"] == 24 and m["num_images"] == 24
    fractions = [f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    fractions += [f"zeroshot/{c}/{x}" for c in ("color", "shape") for x in ("top1", "top5", "mean_per_class")]
    fractions += [f"probe/linear/{c}/{x}" for c in ("color", "shape") for x in ("top1", "top5", "mean_per_class")]
    fractions += ["probe/teacher_knn_overlap", "probe/teacher_knn_overlap_centred", "probe/caption_em",
                  "probe/caption_em_train"]
    assert all(0.0 <= m[k] <= 1.0 for k in fractions), {k: m.get(k) for k in fractions}
    assert m["probe/teacher_knn_chance"] == pytest.approx(3 / 11)  # 12 distinct captions, k = 3
    assert all(isinstance(m[k], str) for k in m if k.startswith("protocol/"))
    # Same weights, same samples: the checkpoint read back gives the training loop's final evaluation.
    final = [r for r in read_metrics(runs["kc"]) if "eval/retrieval/i2t_R@1" in r][-1]
    for key in ("retrieval/i2t_R@1", "retrieval/t2i_R@1", "retrieval/t2i_R@5", "retrieval/i2t_median_rank"):
        assert m[key] == pytest.approx(final[f"eval/{key}"], abs=1e-6)


def test_eval_cli_plain_run_probe_train_and_errors(runs, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["--checkpoint", str(runs["plain"]), "--data", str(runs["data"]), "--label-cols", "color",
               "--probe-train", str(runs["data"]), "--skip", "caption_em,retrieval", "--out", str(out)])
    m = json.loads(out.read_text())
    assert rc == 0 and "retrieval/i2t_R@1" not in m and "probe/caption_em" not in m
    assert m["protocol/teacher_knn"].startswith("skipped") and "probe/linear/color/top1" in m
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--data", str(runs["data"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kclip eval: error:")
    half_written = tmp_path / "half"
    shutil.copytree(runs["data"], half_written)
    (half_written / "stats.json").unlink()  # what an interrupted `kclip prepare` leaves
    for flag, folder, why in (("--data", tmp_path, "is not an MDS dataset"), ("--probe-train", half_written, "incomplete")):
        args = {"--data": str(runs["data"]), flag: str(folder)}
        assert main(["--checkpoint", str(runs["plain"]), *(a for kv in args.items() for a in kv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"kclip eval: error: {flag}: {folder} ") and why in err[0], err


def teacher_folder(folder: Path, random_config: dict) -> Path:
    """Weights saved like a real checkpoint, shaped like the smoke config's random teacher (byte ids fit its vocab)."""
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(**random_config)).save_pretrained(folder)
    load_tokenizer("byte").save_pretrained(folder)
    return folder


def test_plain_run_given_a_teacher_reports_knn_overlap_with_its_own_teacher_settings(runs, tmp_path):
    loaded = load_model(runs["plain"])
    assert not loaded.cfg.needs_teacher and loaded.cfg.teacher.random_config is not None
    folder = teacher_folder(tmp_path / "teacher", loaded.cfg.teacher.random_config)
    loaded.cfg.teacher.layer, loaded.cfg.teacher.pooling = 1, "last"
    cfg = teacher_config(loaded, str(folder))
    # The unused teacher settings the run was trained with (layer, pooling, max_len) go with the given weights.
    assert (cfg.path, cfg.random_config, cfg.layer, cfg.pooling, cfg.max_len) == (str(folder), None, 1, "last", 48)
    assert loaded.cfg.teacher.random_config is not None
    out = tmp_path / "m.json"
    rc = main(["--checkpoint", str(runs["plain"]), "--data", str(runs["data"]), "--teacher", str(folder),
               "--skip", "retrieval,zeroshot,linear,caption_em", "--knn-k", "3", "--out", str(out)])
    m = json.loads(out.read_text())
    assert rc == 0 and 0.0 <= m["probe/teacher_knn_overlap"] <= 1.0
    assert m["probe/teacher_knn_chance"] == pytest.approx(3 / 11) and not m["protocol/teacher_knn"].startswith("skip")


def test_a_second_evaluation_reads_the_teacher_embeddings_from_the_cache_and_a_damaged_one_is_recomputed(
        runs, tmp_path, monkeypatch):
    import kclip.teacher.load

    monkeypatch.setenv("KCLIP_CACHE", str(tmp_path / "cache"))
    args = ["--checkpoint", str(runs["kc"]), "--data", str(runs["data"]), "--skip", "retrieval,zeroshot,linear",
            "--knn-k", "3", "--em-steps", "5", "--em-ae-steps", "5"]
    teacher_keys = ("probe/teacher_knn_overlap", "probe/teacher_knn_overlap_centred", "probe/caption_em_teacher")

    def evaluate_to(name):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        m = json.loads((tmp_path / name).read_text())
        return {k: m[k] for k in teacher_keys}

    first = evaluate_to("first.json")
    files = sorted((tmp_path / "cache" / "eval_teacher").glob("*.pt"))
    assert len(files) == 3  # the kNN probe's captions, the caption probe's training and held-out captions
    build_teacher = kclip.teacher.load.build_teacher
    monkeypatch.setattr(kclip.teacher.load, "build_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    assert evaluate_to("cached.json") == first
    files[0].write_bytes(files[0].read_bytes()[:100])  # torn
    torch.save(torch.full((2, 3), float("nan")), files[1])  # the wrong rows
    monkeypatch.setattr(kclip.teacher.load, "build_teacher", build_teacher)
    assert evaluate_to("recomputed.json") == first
    monkeypatch.setattr(kclip.teacher.load, "build_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    assert evaluate_to("cached_again.json") == first


def test_a_run_evaluated_from_elsewhere_finds_its_relative_teacher_or_says_in_one_line_what_to_pass(
        runs, tmp_path, monkeypatch, capsys):
    """Launched in launch/ with `--output runs/kc` and teacher.path=teachers/tiny, evaluated from another directory:
    the kNN probe reads the teacher found above the run; once it is gone, one line says what to pass instead."""
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = load_config("smoke", [*COMMON, "teacher.path=teachers/tiny", "teacher.random_config=null",
                                f"data.train={runs['data']}", f"data.val={runs['data']}"])
    teacher_folder(launch / "teachers" / "tiny", load_config("smoke", []).teacher.random_config)
    monkeypatch.chdir(launch)
    with single_thread():
        train(cfg, Path("runs/kc"))
    monkeypatch.chdir(elsewhere)
    args = ["--checkpoint", str(launch / "runs" / "kc"), "--data", str(runs["data"]), "--knn-k", "3"]
    probe_only = ["--skip", "retrieval,zeroshot,linear,caption_em"]
    assert main([*args, *probe_only, "--out", "m.json"]) == 0
    assert 0.0 <= json.loads(Path("m.json").read_text())["probe/teacher_knn_overlap"] <= 1.0

    (launch / "teachers").rename(launch / "moved")
    capsys.readouterr()
    assert main([*args, *probe_only]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kclip eval:")]
    assert len(err) == 1 and err[0].startswith("kclip eval: error: teacher.path: the run's teacher teachers/tiny is "
                                               f"not found (relative: looked for from {elsewhere}, "), err
    assert err[0].endswith("pass --teacher PATH for the kNN probe, or --skip knn"), err
    assert main([*args, "--skip", "retrieval,zeroshot,linear,caption_em,knn"]) == 0


def _rank_eval(run: str, data: str):
    loaded = load_model(run)
    return evaluate(loaded, data=data, label_columns=("color",), batch_size=8, skip=("caption_em", "linear"))


@pytest.mark.slow
def test_two_rank_eval_equals_single_process(runs):
    single = evaluate(load_model(runs["kc"]), data=str(runs["data"]), label_columns=("color",), batch_size=8,
                      skip=("caption_em", "linear"))
    ranked = run_ranks(_rank_eval, str(runs["kc"]), str(runs["data"]), world_size=2)
    assert ranked[1] is None
    for key, value in single.items():
        if not key.startswith("protocol/"):
            assert ranked[0][key] == pytest.approx(value, abs=1e-5), key
