"""Fault injection: a rank killed mid-run, damaged checkpoints, diverging losses, changed configs, long runs."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from shapes import make_shapes_mds
from test_train import REPO, _env, losses, run_ok, train_cmd, wait_for

from kclip.dist import free_port
from kclip.train.metrics import read_metrics


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_mds(tmp_path_factory.mktemp("shapes"), n=96)


def test_survivor_names_the_killed_rank_and_exits(shapes, tmp_path):
    """Two ranks started without a launcher (nothing else would kill the survivor): SIGKILL rank 1 mid-run."""
    run, port = tmp_path / "crash", str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = train_cmd(run, shapes, "train.steps=100000", "checkpoint.every=100000", "dist.timeout_s=30")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    code = procs[0].wait(timeout=90)
    err = procs[0].stderr.read()
    assert code == 1 and time.time() - start < 45, err[-3000:]  # the survivor's own account of its end
    # From the failed collective, or from the heartbeat watchdog when rank 0 waited where no collective timeout
    # reaches (streaming's barrier between local ranks at an epoch start).
    errors = [line for line in err.splitlines() if line.startswith("kclip: error: rank 0: ")]
    assert len(errors) == 1 and "rank(s) 1 stopped responding" in errors[0], err[-2000:]
    # The survivor removed its own allreduce buffer on its way out; the killed rank could not.
    left = _own_shm_buffers(port)
    for path in left:
        os.remove(path)
    assert [p.rsplit("_", 1)[1] for p in left] == ["1"], left


@pytest.fixture(scope="module")
def two_checkpoints(shapes, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    run_ok(train_cmd(run, shapes, "train.steps=8", "checkpoint.every=4"))
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _resume_error(run: Path, shapes: Path, *overrides: str, resume: str = "latest") -> str:
    proc = subprocess.run(train_cmd(run, shapes, "train.steps=12", "checkpoint.every=4", *overrides, resume=resume),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_truncated_checkpoint_is_detected_and_the_previous_one_offered(shapes, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    states = run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    model_states = states.read_bytes()
    states.write_bytes(model_states[:1000])
    error = _resume_error(run, shapes)
    assert "step_00000008 could not be loaded" in error and "--resume " + str(run / "checkpoints" / "step_00000004") in error
    states.write_bytes(model_states)
    rank_file = run / "checkpoints" / "step_00000008" / "rank_00000.pt"  # RNG state and embedding buffer
    saved = rank_file.read_bytes()
    rank_file.write_bytes(saved[:100])
    error = _resume_error(run, shapes)
    assert "step_00000008: rank_00000.pt could not be loaded" in error
    assert "--resume " + str(run / "checkpoints" / "step_00000004") in error
    # A rank file that would run code when unpickled (a run folder from someone else) is refused, never run.
    import torch

    from kclip.train.checkpoint import read_rank_state

    rank_file.write_bytes(saved)
    marker = tmp_path / "ran"
    torch.save({**read_rank_state(rank_file), "extra": _Payload(marker)}, rank_file)
    assert "step_00000008: rank_00000.pt could not be loaded (UnpicklingError" in _resume_error(run, shapes)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _set_tokenizer_fingerprint(tag_dir: Path, fingerprint: str | None) -> None:
    """Rewrite the fingerprint of the student's tokenization in the checkpoint's client state (None: remove it)."""
    import torch

    path = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)
    state.pop("tokenizer_fingerprint")
    if fingerprint is not None:
        state["tokenizer_fingerprint"] = fingerprint
    torch.save(state, path)


def test_resuming_on_captions_tokenized_otherwise_fails_in_one_line(shapes, two_checkpoints, tmp_path):
    """A checkpoint trained before the student's tokenization changed (another tokenizer file, or kclip's handling of
    it, as when student captions began to end with the end-of-text token) is not resumed on ids its text tower never
    learnt; one from before fingerprints were saved resumes with a warning."""
    import torch

    from kclip.config import load_config
    from kclip.tokenizers import student_tokenizer
    from kclip.train.state import tokenizer_fingerprint

    run = _copy(two_checkpoints, tmp_path)
    tag_dir = run / "checkpoints" / "step_00000008"
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["tokenizer_fingerprint"]
    assert saved == tokenizer_fingerprint(student_tokenizer(load_config("smoke")), max_len=48)
    _set_tokenizer_fingerprint(tag_dir, "0" * 16)  # as if its captions had been tokenized otherwise
    assert _resume_error(run, shapes) == (
        f"kclip: error: checkpoint {tag_dir} tokenizes captions differently from this run's student tokenizer (byte, "
        f"student.text_max_len 48); resume with the tokenizer it was trained with or start a new run (or pass "
        f"--allow-config-change to accept)")
    _set_tokenizer_fingerprint(tag_dir, None)
    proc = run_ok(train_cmd(run, shapes, "train.steps=8", "checkpoint.every=4", resume="latest"))
    assert f"checkpoint {tag_dir} holds no tokenizer fingerprint" in proc.stderr, proc.stderr[-2000:]


def test_a_save_killed_midway_is_never_resumed(shapes, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    (run / "checkpoints" / "step_00000008" / "COMPLETE").unlink()  # what a kill before the marker leaves behind
    error = _resume_error(run, shapes, resume=str(run / "checkpoints" / "step_00000008"))
    assert "is missing or incomplete" in error and "step_00000004" in error


def test_resuming_with_a_changed_config_lists_the_keys(shapes, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    saved_config = (run / "config.yaml").read_text()
    error = _resume_error(run, shapes, "loss.distill_weight=0.5", "optim.lr=0.01")
    assert "loss.distill_weight: 1.0 -> 0.5" in error and "optim.lr" in error
    assert (run / "config.yaml").read_text() == saved_config  # a refused resume leaves the folder as it was
    assert not (run / "run.lock").exists()  # released on the error exit
    proc = run_ok(train_cmd(run, shapes, "train.steps=12", "checkpoint.every=4", "loss.distill_weight=0.5",
                            "optim.lr=0.01", resume="latest") + ["--allow-config-change"])
    assert max(losses(run)) == 12, proc.stderr[-1000:]


def test_diverging_loss_skips_updates_then_stops_naming_the_term(shapes, tmp_path):
    proc = subprocess.run(train_cmd(tmp_path / "nan", shapes, "optim.lr=1.0e+30", "optim.warmup_steps=1",
                                    "train.max_bad_steps=3", "optim.grad_clip=0"),
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("kclip: error:")]
    assert len(error) == 1 and "3 consecutive non-finite losses" in error[0] and "contrastive" in error[0], proc.stderr[-2000:]
    assert proc.stderr.count("non-finite loss") >= 3


def test_missing_shard_fails_before_training(shapes, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    for path in data.glob("shard.00000.mds*"):  # the compressed shard and streaming's decompressed copy
        path.unlink()
    proc = subprocess.run(train_cmd(tmp_path / "run", data), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "data.train:" in proc.stderr and "missing" in proc.stderr


def _write_mds(folder: Path, records: list[dict]) -> Path:
    """An MDS folder as `kclip prepare` writes it (stats.json marks it complete), but holding records prepare would
    skip."""
    from streaming import MDSWriter

    from kclip.data.prepare import write_stats

    with MDSWriter(out=str(folder), columns={"id": "str", "image": "bytes", "caption": "str"}, compression="zstd") as w:
        for record in records:
            w.write(record)
    write_stats(str(folder), {"written": len(records)})
    return folder


def test_corrupt_images_and_overlong_captions_are_counted_not_fatal(tmp_path):
    import io

    from shapes import draw

    records = []
    for i in range(32):
        buf = io.BytesIO()
        draw("red" if i % 2 else "blue", "circle", i).save(buf, format="PNG")
        image = buf.getvalue()
        if i in (3, 17):
            image = image[: len(image) // 3]  # truncated file
        caption = "a circle " * (200 if i == 5 else 1)  # far beyond both tokenizers' limits
        records.append({"id": f"s{i}", "image": image, "caption": caption})
    data = _write_mds(tmp_path / "data", records)
    run = tmp_path / "run"
    run_ok(train_cmd(run, data, "train.steps=2", "concepts.warmup_steps=2"))  # exactly one epoch
    last = read_metrics(run)[-1]
    assert last["count/replaced_samples"] == 2 and last["count/truncated_captions"] == 1


@pytest.mark.slow
def test_soak_memory_flat_and_nothing_accumulates(shapes, tmp_path):
    shm_before = set(os.listdir("/dev/shm"))
    run = tmp_path / "soak"
    run_ok(train_cmd(run, shapes, "train.steps=300", "log.every=25", "checkpoint.every=50", "concepts.recompute_every=20"),
           timeout=900)
    rss = {row["step"]: row["rss_mb"] for row in read_metrics(run) if "rss_mb" in row}
    # After warm-up (allocator pools, first concept fits), resident memory must not keep growing.
    assert rss[300] - rss[100] < 40, rss
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000250", "step_00000300"]
    assert set(os.listdir("/dev/shm")) - shm_before == set()  # nothing, DeepSpeed's allreduce buffer included


def test_universal_copies_take_no_keep_last_slot_and_go_with_their_checkpoint(tmp_path):
    from kclip.train import checkpoint

    for name in ("step_00000010", "step_00000020", "step_00000020_universal", "step_00000030", "step_00000040"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.COMPLETE).write_text("world_size=2\n")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step_00000010", "step_00000020", "step_00000030", "step_00000040"]
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]


def _own_shm_buffers(port: str) -> list[str]:
    import glob

    from kclip.config.preflight import shm_buffer_glob

    return glob.glob(shm_buffer_glob(port))


def test_runs_leave_dev_shm_as_they_found_it_also_on_error_exits(shapes, tmp_path):
    """DeepSpeed's CPU allreduce buffer (66 MiB per rank) goes with the run: after a clean exit and after an error."""
    for name, overrides, code in (("ok", ["train.steps=2"], 0),
                                  ("nan", ["optim.lr=1.0e+30", "optim.warmup_steps=1", "train.max_bad_steps=1",
                                           "optim.grad_clip=0", "train.steps=4"], 1)):
        port = str(free_port())
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        proc = subprocess.run(train_cmd(tmp_path / name, shapes, *overrides), env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert _own_shm_buffers(port) == [], name


def test_a_dev_shm_too_small_fails_before_any_process_group(shapes, tmp_path, monkeypatch, capsys):
    import shutil

    from kclip.cli import main
    from kclip.config import preflight

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(64 << 20, 32 << 20, 32 << 20))
    assert main(["train", "--config", "smoke", "--output", str(tmp_path / "run"), f"data.train={shapes}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "/dev/shm has 32 MiB free; DeepSpeed's CPU accelerator needs 66 MiB" in error[0], error
    assert "--shm-size" in error[0] and not (tmp_path / "run").exists()
