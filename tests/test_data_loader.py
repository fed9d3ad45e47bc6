"""Loader: batch contract, corrupt-record replacement, rank sharding, and exact mid-epoch resume (also elastic)."""
from __future__ import annotations

import io
import os
import re
import time

import pytest
import torch
from multiproc import run_ranks
from PIL import Image, ImageDraw
from streaming import MDSWriter

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def sample_image(i: int) -> bytes:
    """A two-tone picture: a random crop of it changes the pixels, a solid image would not."""
    img = Image.new("RGB", (40, 32), COLORS[i % 4])
    ImageDraw.Draw(img).rectangle([4 + i % 7, 6, 24, 26], fill=COLORS[(i + 1) % 4])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"sample {i} " + "word " * (i % 9)  # 9 to 49 bytes: some exceed the test max lengths


def write_dataset(folder, n: int, corrupt: tuple[int, ...] = ()) -> str:
    """An MDS folder as `kclip prepare` writes it, but with records chosen to be corrupt (prepare would skip them)."""
    columns = {"id": "str", "image": "bytes", "caption": "str", "kind": "str"}
    with MDSWriter(out=str(folder), columns=columns, compression="zstd", size_limit=4000) as w:
        for i in range(n):
            image = b"\x89PNG\r\n\x1a\n broken" if i in corrupt else sample_image(i)
            w.write({"id": f"s{i:03d}", "image": image, "caption": caption(i), "kind": f"k{i % 3}"})
    return str(folder)


@pytest.fixture
def restore_env():
    """build_loader fills launcher variables (RANK=0, ...) into os.environ; keep them out of other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def loader(folder, **kw):
    from kclip.data.loader import build_loader

    args = dict(batch_size=4, image_size=16, train=False, student_tokenizer="byte", student_max_len=24,
                num_workers=0, shuffle=False)
    return build_loader(folder, **{**args, **kw})


def test_batch_contract(tmp_path, restore_env):
    from kclip.tokenizers import load_tokenizer

    folder = write_dataset(tmp_path / "mds", 12)
    pad = load_tokenizer("byte").pad_token_id
    batches = list(loader(folder, teacher_tokenizer="byte", teacher_max_len=40, label_columns=["kind"]))
    assert len(batches) == 3
    b = batches[1]
    idx = [4, 5, 6, 7]
    assert b["sample_id"] == [f"s{i:03d}" for i in idx]
    assert b["index"].tolist() == idx
    assert b["labels"] == {"kind": [f"k{i % 3}" for i in idx]}
    assert b["pixels"].shape == (4, 3, 16, 16) and b["pixels"].dtype == torch.float32
    # eval transform: resize + centre crop + CLIP normalisation; a corner pixel keeps the background colour
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(b["pixels"][0, :, 0, 0], (torch.tensor(COLORS[idx[0] % 4]) / 255 - mean) / std, atol=0.02)

    n_tokens = [len(caption(i).encode()) + 1 for i in idx]  # byte tokenizer: one id per byte + EOS
    assert b["input_ids"].shape == (4, min(max(n_tokens), 24)) and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].sum(1).tolist() == [min(n, 24) for n in n_tokens]
    assert b["teacher_input_ids"].shape == (4, min(max(n_tokens), 40))
    mask = b["teacher_attention_mask"]
    assert mask.sum(1).tolist() == [min(n, 40) for n in n_tokens]
    assert torch.equal(mask, mask.cummin(1).values), "teacher tokens must be right-padded"
    assert (b["teacher_input_ids"][mask == 0] == pad).all()
    assert b["truncated"].tolist() == [int(n > 24) for n in n_tokens]
    assert b["replaced"].tolist() == [0, 0, 0, 0]

    with pytest.raises(ValueError, match=r"no label column\(s\) \['nope'\]"):
        loader(folder, label_columns=["nope"])


def test_corrupt_record_is_replaced_by_next_decodable_and_flagged(tmp_path, restore_env):
    folder = write_dataset(tmp_path / "mds", 8, corrupt=(3, 4, 7))
    (batch,) = list(loader(folder, batch_size=8))
    assert batch["sample_id"] == ["s000", "s001", "s002", "s005", "s005", "s005", "s006", "s000"]
    assert batch["index"].tolist() == [0, 1, 2, 5, 5, 5, 6, 0]
    assert batch["replaced"].tolist() == [0, 0, 0, 1, 1, 0, 0, 1]


def test_train_crops_are_seeded_per_sample_and_epoch_and_leave_caller_rng_alone(tmp_path, restore_env):
    folder = write_dataset(tmp_path / "mds", 8)
    rng = torch.get_rng_state()
    a = loader(folder, batch_size=8, train=True, seed=1)
    epoch0, epoch1 = next(iter(a))["pixels"], next(iter(a))["pixels"]
    again = next(iter(loader(folder, batch_size=8, train=True, seed=1)))["pixels"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(epoch0, again)  # a fresh loader reproduces epoch 0's crops
    assert not torch.equal(epoch0, epoch1)  # the next epoch crops differently


# ---------------------------------------------------------------- multi-rank: sharding and resume

N, K, BATCH, WORKERS, SEED = 64, 3, 4, 2, 5


def _epochs(dl, n_epochs: int, stop_at: int | None = None):
    """Batches of sample ids per epoch, plus per-sample pixel sums, plus the state after `stop_at` batches."""
    ids, pixels, state = [], {}, None
    for epoch in range(n_epochs):
        ids.append([])
        for b in dl:
            ids[-1].append(b["sample_id"])
            pixels.update({(epoch, s): round(float(p.sum()), 3) for s, p in zip(b["sample_id"], b["pixels"])})
            if epoch == 0 and stop_at is not None and len(ids[0]) == stop_at:
                state = dl.state_dict()
    return ids, pixels, state


def rank_uninterrupted(folder: str, ragged_folder: str):
    from kclip.data.loader import build_loader

    kw = dict(image_size=16, train=True, student_tokenizer="byte", student_max_len=24, num_workers=WORKERS, seed=SEED)
    ids, pixels, state = _epochs(build_loader(folder, batch_size=BATCH, **kw), 2, stop_at=K)
    ragged = [b["sample_id"] for b in build_loader(ragged_folder, batch_size=BATCH, **kw)]
    return ids, pixels, state, len(ragged)


def rank_resumed(folder: str, state: dict, batch_size: int):
    from kclip.data.loader import build_loader

    dl = build_loader(folder, batch_size=batch_size, image_size=16, train=True, student_tokenizer="byte",
                      student_max_len=24, num_workers=WORKERS, seed=SEED)
    dl.load_state_dict(state)
    ids, pixels, _ = _epochs(dl, 2)
    return ids, pixels


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    folder = write_dataset(root / "even", N)
    ragged = write_dataset(root / "ragged", 45)  # 45 does not split evenly over 2 ranks x 4
    return folder, run_ranks(rank_uninterrupted, folder, ragged)


@pytest.mark.slow
def test_two_ranks_read_disjoint_shares_of_each_epoch(uninterrupted):
    _, ((ids0, _, _, ragged0), (ids1, _, _, ragged1)) = uninterrupted
    for epoch in range(2):
        r0 = [s for b in ids0[epoch] for s in b]
        r1 = [s for b in ids1[epoch] for s in b]
        assert not set(r0) & set(r1)
        assert sorted(r0 + r1) == [f"s{i:03d}" for i in range(N)]
        assert len(ids0[epoch]) == len(ids1[epoch]) == N // (2 * BATCH)
    assert ids0[0] != ids0[1]  # reshuffled per epoch
    assert ragged0 == ragged1 == 5  # streaming pads 45 to 46 = 23 per rank; drop_last keeps 5 full batches each


@pytest.mark.slow
def test_resume_on_two_ranks_continues_exactly(uninterrupted):
    folder, ((ids0, px0, state, _), (ids1, px1, _, _)) = uninterrupted
    assert state["sample_in_epoch"] == K * BATCH * 2
    (r_ids0, r_px0), (r_ids1, r_px1) = run_ranks(rank_resumed, folder, state, BATCH)
    assert r_ids0 == [ids0[0][K:], ids0[1]]
    assert r_ids1 == [ids1[0][K:], ids1[1]]
    for r_px, px in ((r_px0, px0), (r_px1, px1)):  # same crops: augmentation is seeded per (epoch, sample)
        assert len(r_px) == (N // 2) * 2 - K * BATCH and all(r_px[key] == px[key] for key in r_px)


@pytest.mark.slow
def test_resume_elastic_on_one_rank_with_same_global_batch(uninterrupted):
    folder, ((ids0, px0, state, _), (ids1, px1, _, _)) = uninterrupted
    ((r_ids, r_px),) = run_ranks(rank_resumed, folder, state, 2 * BATCH, world_size=1)
    expected = [[set(a) | set(b) for a, b in zip(ids0[0][K:], ids1[0][K:])],
                [set(a) | set(b) for a, b in zip(ids0[1], ids1[1])]]
    assert [[set(b) for b in epoch] for epoch in r_ids] == expected
    assert all(r_px[key] == {**px0, **px1}[key] for key in r_px)


def test_truncation_is_flagged_exactly_at_the_limit():
    from kclip.data.loader import tokenize
    from kclip.tokenizers import load_tokenizer

    # byte tokenizer: one id per byte + EOS, so a caption of 7 bytes fills max_len=8 exactly without truncation
    ids, mask, truncated = tokenize(load_tokenizer("byte"), ["abcde", "abcdefg", "abcdefgh", "abcdefghijklmnop"], 8)
    assert mask.sum(1).tolist() == [6, 8, 8, 8] and ids.shape == (4, 8)
    assert truncated.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_deleted_mid_run_is_named_in_one_line(tmp_path, restore_env, workers):
    """streaming says only "In the absence of local dataset, path to remote dataset must be provided"."""
    from kclip.cli import one_line
    from kclip.data.datasets import DataError

    folder = write_dataset(tmp_path / "d", 80)
    shards = sorted(p for p in os.listdir(folder) if p.startswith("shard.") and p.endswith(".zstd"))
    assert len(shards) >= 2
    batches = iter(loader(folder, num_workers=workers))
    next(batches)
    first = shards[0].split(".mds")[0] + "."

    def delete_all_shards_but_the_first() -> int:
        doomed = [n for n in os.listdir(folder) if n.startswith("shard.") and not n.startswith(first)]
        for name in doomed:
            os.remove(os.path.join(folder, name))
        return len(doomed)

    # streaming's prefetch thread may be decompressing a shard right now: its .mds then appears after the deletion,
    # the data is whole again and nothing should fail. Delete until no decompression in flight brings a file back.
    delete_all_shards_but_the_first()
    quiet = 0
    while quiet < 5:  # half a second without a file coming back
        time.sleep(0.1)
        quiet = quiet + 1 if delete_all_shards_but_the_first() == 0 else 0
    with pytest.raises(DataError) as caught:
        for _ in batches:
            pass
    message = one_line(caught.value)  # from a worker, the text carries the worker's traceback
    assert "\n" not in message and message.startswith("data: shard shard.") and f"of {folder} is gone" in message
    assert message.split()[2].removesuffix(".mds.zstd") != shards[0].removesuffix(".mds.zstd")


def test_a_deleted_shard_met_first_by_the_prefetch_thread_fails_instead_of_ending_the_epoch_early(
        tmp_path, restore_env):
    """streaming's yield loop stops, silently, once its prefetch thread has failed: a short epoch would pass for a
    whole one. The failure is signalled as streaming's own callback does (its event set) between two batches, with
    the later shards deleted, so no read of kclip's meets the missing shard before the yield loop does."""
    from kclip.data.datasets import DataError

    folder = write_dataset(tmp_path / "d", 80)
    first = sorted(p for p in os.listdir(folder) if p.endswith(".zstd"))[0].split(".mds")[0] + "."
    data = loader(folder, num_workers=0)
    batches = iter(data)
    next(batches)
    for name in os.listdir(folder):
        if name.startswith("shard.") and not name.startswith(first):
            os.remove(os.path.join(folder, name))
    data.dataset._event.set()  # what streaming's on_exception does when a background thread raises
    with pytest.raises(DataError, match=r"^data: shard shard\.0000[1-9]\.mds\.zstd of .* is gone"):
        next(batches)


@pytest.mark.parametrize("which", [0, -1])  # the first shard: both threads prepare it at once; the last: read ahead
def test_a_damaged_compressed_shard_is_one_line_not_a_hang(tmp_path, restore_env, which):
    """A thread whose decompression fails leaves the shard marked as being prepared, where streaming's own wait for
    it (the reading thread's) would sleep forever."""
    from kclip.data.datasets import DataError

    folder = write_dataset(tmp_path / "d", 80)
    last = sorted(p for p in os.listdir(folder) if p.endswith(".zstd"))[which]
    with open(os.path.join(folder, last), "r+b") as f:  # same size, so only the decompression can tell
        f.write(b"\0" * 64)
    # Read in the process (the shard's first read prepares it) or met first by the prefetch thread: the same line.
    with pytest.raises(DataError, match=rf"^data: shard {re.escape(last)} of {re.escape(folder)} cannot be read"):
        for _ in loader(folder, num_workers=0):
            pass
