"""Bad inputs to the converters and to validation: interrupted conversions, damaged indexes, huge CSV fields, images
that decode to something else (16-bit grayscale, animations) and images too large to decode."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_data_loader import restore_env  # noqa: F401 - fixture
from test_data_prepare import image_bytes, read_mds, rejects_of, stats_of

from kclip.cli import main
from kclip.config import ConfigError
from kclip.config.preflight import check_mds
from kclip.data import sources
from kclip.data.cli import prepare_main
from kclip.data.prepare import write_mds
from kclip.data.sources import csv_candidates, folder_candidates
from kclip.data.transforms import decode_rgb

REPO = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text.strip()


def noise_png(i: int, side: int = 100) -> bytes:
    """~30 KB that PNG cannot compress: a few dozen fill a 1 MB shard."""
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def captioned_folder(root: Path, images: dict[str, bytes]) -> Path:
    """`name` + `stem.txt` caption for each image."""
    root.mkdir(parents=True)
    for name, data in images.items():
        (root / name).write_bytes(data)
        (root / f"{name.rsplit('.', 1)[0]}.txt").write_text(f"caption of {name}")
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A complete, valid dataset of 8 records."""
    src = captioned_folder(tmp_path / "src", {f"x{i}.png": image_bytes(i) for i in range(8)})
    out = tmp_path / "mds"
    write_mds(folder_candidates(str(src)), str(out))
    assert check_mds("data.train", str(out), required=True) == 8
    return out


# ---------------------------------------------------------------- interrupted conversions


def test_sigint_during_conversion_leaves_no_dataset_and_a_clean_rerun(tmp_path):
    """Ctrl-C after several 1 MB shards were written. The old converter's MDSWriter closed on the way out and wrote an
    index.json of the shards so far, which training then used without a word."""
    src = captioned_folder(tmp_path / "src", {f"a{i:03d}.png": noise_png(i) for i in range(200)})
    os.mkfifo(src / "z.png")  # sorted last: opening it blocks the converter, mid-run, for as long as the test needs
    (src / "z.txt").write_text("never read")
    out = tmp_path / "mds"
    cmd = [sys.executable, "-m", "kclip.cli", "prepare", "folder", "--src", str(src), "--out", str(out),
           "--shard-mb", "1", "--workers", "1"]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("mds*/shard.*"))) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert one_line(err) == f"kclip prepare: interrupted; nothing written to {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # neither mds nor mds.partial
    with pytest.raises(ConfigError, match=f"^data.train: {out} is not an MDS dataset"):
        check_mds("data.train", str(out), required=True)

    (src / "z.png").unlink()
    (src / "z.txt").unlink()
    assert prepare_main(["folder", "--src", str(src), "--out", str(out), "--shard-mb", "1", "--workers", "1"]) == 0
    assert check_mds("data.train", str(out), required=True) == 200


def test_a_failing_write_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A full disk halfway through: one line, exit 2, and no folder that could pass for the dataset."""
    from streaming import MDSWriter

    src = captioned_folder(tmp_path / "src", {f"x{i}.png": image_bytes(i) for i in range(8)})
    write, count = MDSWriter.write, []

    def full_disk(self, sample):
        count.append(1)
        if len(count) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, sample)

    monkeypatch.setattr(MDSWriter, "write", full_disk)
    out = tmp_path / "mds"
    assert prepare_main(["folder", "--src", str(src), "--out", str(out), "--workers", "1"]) == 2
    assert one_line(capsys.readouterr().err) == "kclip prepare: error: [Errno 28] No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_leftover_partial_folder_is_named_not_overwritten(tmp_path, capsys):
    """A conversion killed outright (SIGKILL) leaves OUT.partial: the next one says so instead of mixing into it."""
    src = captioned_folder(tmp_path / "src", {"x.png": image_bytes(0)})
    (tmp_path / "mds.partial").mkdir()
    assert prepare_main(["folder", "--src", str(src), "--out", str(tmp_path / "mds")]) == 2
    assert "mds.partial exists: another `kclip prepare` is writing" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------- validation of damaged datasets


def _drop_stats(folder: Path) -> None:
    """What an interrupted conversion of the old converter left: shards and index.json, no stats.json."""
    (folder / "stats.json").unlink()


def _wrong_count(folder: Path) -> None:
    (folder / "stats.json").write_text(json.dumps({"written": 9}))


def _truncated_index(folder: Path) -> None:
    text = (folder / "index.json").read_text()
    (folder / "index.json").write_text(text[: len(text) // 2])


def _garbage_index(folder: Path) -> None:
    (folder / "index.json").write_bytes(b"\xff\xfe\x00garbage")


def _index_without_shards(folder: Path) -> None:
    (folder / "index.json").write_text(json.dumps({"version": 2}))


def _shard_without_samples(folder: Path) -> None:
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": [{"raw_data": {"basename": "x"}}]}))


def _no_samples(folder: Path) -> None:
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    (folder / "stats.json").write_text(json.dumps({"written": 0}))


@pytest.mark.parametrize("damage, message", [
    (_drop_stats, "{folder} is incomplete: no stats.json, which `kclip prepare` writes last"),
    (_wrong_count, "{folder} is incomplete: index.json lists 8 samples, stats.json says `kclip prepare` wrote 9"),
    (_truncated_index, "{folder}/index.json is unreadable (JSONDecodeError: "),
    (_garbage_index, "{folder}/index.json is unreadable (UnicodeDecodeError: "),
    (_index_without_shards, "{folder}/index.json is not an MDS index (no valid shard list: KeyError: 'shards')"),
    (_shard_without_samples, "{folder}/index.json is not an MDS index (no valid shard list: KeyError: 'samples')"),
    (_no_samples, "{folder} holds no samples (`kclip prepare` skipped every record: see its rejects.jsonl)"),
], ids=["interrupted", "wrong-count", "truncated-index", "garbage-index", "no-shards", "shard-without-samples",
        "empty"])
def test_damaged_dataset_is_one_config_error_naming_key_and_file(dataset, damage, message):
    damage(dataset)
    with pytest.raises(ConfigError) as info:
        check_mds("data.val", str(dataset), required=False)
    text = one_line(str(info.value))
    assert text.startswith("data.val: ") and message.format(folder=dataset) in text, text


def test_training_on_an_incomplete_dataset_stops_before_starting(dataset, tmp_path, capsys, restore_env):  # noqa: F811
    _drop_stats(dataset)
    assert main(["train", "--config", "smoke", "--output", str(tmp_path / "run"), f"data.train={dataset}"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"kclip: error: data.train: {dataset} is incomplete") and "re-run `kclip prepare`" in err


# ---------------------------------------------------------------- CSV fields


def csv_with_captions(root: Path, captions: list[str]) -> Path:
    captioned_folder(root, {f"x{i}.png": image_bytes(i) for i in range(len(captions))})
    lines = ["filepath,title"] + [f"x{i}.png,{c}" for i, c in enumerate(captions)]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def test_caption_over_the_csv_modules_default_field_limit_converts(tmp_path):
    """131,072 characters is the csv module's default limit; one longer field used to abort the whole conversion."""
    src = csv_with_captions(tmp_path / "src", ["short", "w" * 200_000, "after"])
    stats = write_mds(csv_candidates(str(src)), str(tmp_path / "mds"))
    assert stats["written"] == 3 and stats["skipped_total"] == 0
    assert [len(r["caption"]) for r in read_mds(tmp_path / "mds")] == [5, 200_000, 5]


def test_row_over_the_field_limit_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CSV_FIELD_LIMIT", 1000)
    src = csv_with_captions(tmp_path / "src", ["first", "w" * 2000, "third", "fourth"])
    out = tmp_path / "mds"
    stats = write_mds(csv_candidates(str(src)), str(out))
    assert stats["written"] == 3 and stats["skipped"] == {"unreadable_row": 1}
    assert rejects_of(out) == [{"id": "pairs.csv:3", "source": "pairs.csv:3", "reason": "unreadable_row",
                                "detail": "csv.Error: field larger than field limit (1000)"}]
    assert [r["caption"] for r in read_mds(out)] == ["first", "third", "fourth"]  # reading went on after the row
    assert check_mds("data.train", str(out), required=True) == 3


# ---------------------------------------------------------------- images that decode to something else


def gray16_png(values: np.ndarray, transparent: int | None = None) -> bytes:
    buf = io.BytesIO()
    extra = {} if transparent is None else {"transparency": transparent}
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG", **extra)
    return buf.getvalue()


def test_16_bit_grayscale_keeps_its_high_byte():
    """Pillow's convert() clipped 16-bit values at 255: this mid-gray ramp decoded as almost all white."""
    ramp = np.arange(0, 65536, 256).reshape(16, 16)  # 0x0000, 0x0100, ..., 0xff00
    assert Image.open(io.BytesIO(gray16_png(ramp))).mode == "I;16"
    rgb = np.asarray(decode_rgb(gray16_png(ramp)))
    assert rgb.shape == (16, 16, 3) and (rgb == (ramp >> 8)[..., None]).all()

    keyed = np.full((4, 4), 0x8000)
    keyed[0, 0] = 0x1234  # the transparency key: composited onto white like every transparent pixel
    rgb = np.asarray(decode_rgb(gray16_png(keyed, transparent=0x1234)))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 1]) == (128, 128, 128)


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def test_multi_frame_images_keep_their_first_frame_and_are_counted(tmp_path):
    src = captioned_folder(tmp_path / "src", {
        "anim.gif": animation("GIF"), "anim.png": animation("PNG"), "still.png": image_bytes(0),
    })
    stats = write_mds(folder_candidates(str(src)), str(tmp_path / "mds"))
    assert stats["written"] == 3 and stats["multi_frame"] == 2
    records = {r["id"]: r for r in read_mds(tmp_path / "mds")}
    for name in ("anim.gif", "anim.png"):
        assert records[name]["image"] == (src / name).read_bytes()  # stored untouched
        assert decode_rgb(records[name]["image"]).getpixel((8, 8)) == (255, 0, 0)  # what training sees: frame 1


# ---------------------------------------------------------------- images too large to decode


def png_of_zeros(width: int, height: int, rows: bool = True) -> bytes:
    """A valid 8-bit grayscale PNG of `width` x `height` black pixels, compressed row by row (a 144 Mpx one is ~140 KB);
    rows=False leaves out the pixel data: only the header, which is all a size check may read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = b""
    if rows:
        z, row = zlib.compressobj(), bytes(width + 1)  # filter byte 0, then the pixels
        idat = chunk(b"IDAT", b"".join(z.compress(row) for _ in range(height)) + z.flush())
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's warning from 89 Mpx up
def test_huge_images_are_rejected_from_their_header(tmp_path, monkeypatch):
    """144 Mpx in ~140 KB took 1.9 GB to check and ~3 s per draw in training. The size is read from the header: a
    decode of it here would turn the reason into unreadable_image."""
    def refuse_big(self):
        assert self.width * self.height < 10**6, "decoded a huge image"
        return load(self)

    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_big)
    src = captioned_folder(tmp_path / "src", {"huge.png": png_of_zeros(12_000, 12_000), "small.png": image_bytes(0)})
    assert len((src / "huge.png").read_bytes()) < 500_000
    stats = write_mds(folder_candidates(str(src)), str(tmp_path / "default"))
    assert stats["written"] == 1 and stats["skipped"] == {"too_many_pixels": 1}
    detail = rejects_of(tmp_path / "default")[0]["detail"]
    assert detail == "12000x12000 = 144,000,000 pixels, over max_pixels 67,108,864"

    out = tmp_path / "small_limit"
    assert prepare_main(["folder", "--src", str(src), "--out", str(out), "--max-pixels", "300"]) == 0
    assert stats_of(out)["skipped"] == {"too_many_pixels": 2}  # small.png is 24 x 16 = 384 pixels


def test_pillows_own_decompression_bomb_error_is_counted(tmp_path):
    """Above 2 x Image.MAX_IMAGE_PIXELS (179 Mpx) Image.open itself raises, whatever --max-pixels allows."""
    src = captioned_folder(tmp_path / "src", {"bomb.png": png_of_zeros(20_000, 10_000, rows=False)})
    stats = write_mds(folder_candidates(str(src)), str(tmp_path / "mds"), max_pixels=10**9)
    assert stats["skipped"] == {"too_many_pixels": 1}
    assert rejects_of(tmp_path / "mds")[0]["detail"].startswith("Image size (200000000 pixels) exceeds limit")


@pytest.mark.parametrize("option", ["--max-pixels", "--shard-mb", "--workers"])
def test_size_options_must_be_positive(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as info:
        prepare_main(["folder", "--src", str(tmp_path), "--out", str(tmp_path / "mds"), option, "0"])
    assert info.value.code == 2 and f"{option}: must be >= 1, got 0" in capsys.readouterr().err
