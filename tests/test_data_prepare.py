"""Converters: broken records are skipped and counted exactly, good ones stored untouched, output reproducible."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from PIL import Image, ImageDraw

from kclip.data.cli import prepare_main
from kclip.data.prepare import write_mds
from kclip.data.sources import csv_candidates, folder_candidates, tar_candidates


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (24, 16), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([i % 8, 2, 12 + i % 8, 12], fill=(i * 37 % 256, i * 91 % 256, 90))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = image_bytes(99, "JPEG")
    return data[: len(data) // 2]


NOT_AN_IMAGE = b"this is not an image at all"


def read_mds(folder) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(folder), shuffle=False)
    return [ds[i] for i in range(ds.num_samples)]


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def stats_of(folder) -> dict:
    return json.loads((folder / "stats.json").read_text())


def rejects_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "rejects.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- CSV


@pytest.fixture
def csv_input(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for i in range(6):
        ext = "jpg" if i % 2 else "png"
        (src / "images" / f"g{i}.{ext}").write_bytes(image_bytes(i, "JPEG" if i % 2 else "PNG"))
    (src / "images" / "trunc.jpg").write_bytes(truncated_jpeg())
    (src / "images" / "text.png").write_bytes(NOT_AN_IMAGE)
    rows = [f"images/g{i}.{'jpg' if i % 2 else 'png'}\tpicture number {i}\tkind{i % 2}".encode() for i in range(6)]
    rows += [
        b"images/trunc.jpg\ta truncated jpeg\tkind0",
        b"images/text.png\tnot an image\tkind0",
        b"images/g0.png\t   \tkind0",  # empty caption
        b"images/g1.jpg\tcaf\xe9 latin-1 bytes\tkind1",  # non-UTF-8
        b"images/missing.png\tthe file is gone\tkind0",
        b"images/g4.png\tgood caption, bad label\tkind\xff",  # a label that would not encode as UTF-8
        b"images/g2.png\tsecond caption for g2\tkind0",  # same image again: id gets a suffix
    ]
    (src / "pairs.tsv").write_bytes(b"filepath\ttitle\tkind\n" + b"\n".join(rows) + b"\n")
    return src / "pairs.tsv"


def test_csv_converts_good_rows_and_counts_each_broken_one(tmp_path, csv_input):
    out = tmp_path / "out"
    argv = ["csv", "--src", str(csv_input), "--out", str(out), "--label-cols", "kind", "--workers", "1"]
    assert prepare_main(argv) == 0

    stats = stats_of(out)
    assert stats["written"] == 7
    assert stats["skipped"] == {
        "unreadable_image": 2, "empty_caption": 1, "non_utf8_caption": 1, "missing_image": 1, "non_utf8_metadata": 1,
    }
    assert sum(stats["caption_tokens"]["histogram"].values()) == 7
    assert [r["reason"] for r in rejects_of(out)] == [
        "unreadable_image", "unreadable_image", "empty_caption", "non_utf8_caption", "missing_image",
        "non_utf8_metadata",
    ]
    assert rejects_of(out)[4]["id"] == "images/missing.png"

    records = read_mds(out)
    assert [r["id"] for r in records] == [f"images/g{i}.{'jpg' if i % 2 else 'png'}" for i in range(6)] + [
        "images/g2.png#1"
    ]
    assert records[3]["image"] == (csv_input.parent / "images" / "g3.jpg").read_bytes()  # untouched bytes
    assert records[3]["caption"] == "picture number 3"
    assert [r["kind"] for r in records] == ["kind0", "kind1"] * 3 + ["kind0"]


def test_csv_reconversion_is_byte_identical_with_any_worker_count(tmp_path, csv_input):
    runs = []
    for name, workers in (("a", 1), ("b", 2), ("c", 2)):
        stats = write_mds(
            csv_candidates(str(csv_input), label_cols=("kind",)), str(tmp_path / name), label_columns=("kind",),
            workers=workers,
        )
        assert stats["written"] == 7
        runs.append(folder_bytes(tmp_path / name))
    assert runs[0] == runs[1] == runs[2]
    assert "shard.00000.mds.zstd" in runs[0]


def test_csv_bad_column_fails_in_one_line_before_writing(tmp_path, csv_input, capsys):
    out = tmp_path / "out"
    assert prepare_main(["csv", "--src", str(csv_input), "--out", str(out), "--caption-col", "caption"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no column(s) ['caption']" in err and "\n" not in err
    assert not out.exists()


def test_output_folder_must_be_empty(tmp_path, csv_input):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_mds(csv_candidates(str(csv_input)), str(out))


# ---------------------------------------------------------------- folder


def test_folder_with_sidecars_and_broken_records(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(4):
        (src / "a" / f"x{i}.png").write_bytes(image_bytes(i))
        (src / "a" / f"x{i}.txt").write_text(f"caption {i}\n")
        (src / "a" / f"x{i}.json").write_text(json.dumps({"kind": f"k{i}", "url": "http://example.invalid"}))
    broken = {
        "trunc.jpg": truncated_jpeg(), "trunc.txt": b"truncated", "trunc.json": b'{"kind": "k"}',
        "junk.png": NOT_AN_IMAGE, "junk.txt": b"junk", "junk.json": b'{"kind": "k"}',
        "empty.png": image_bytes(5), "empty.txt": b"\n \n", "empty.json": b'{"kind": "k"}',
        "latin.png": image_bytes(6), "latin.txt": b"\xff\xfebad", "latin.json": b'{"kind": "k"}',
        "nocaption.png": image_bytes(7), "nocaption.json": b'{"kind": "k"}',
        "orphan.txt": b"a caption whose image is missing",
        "nolabel.png": image_bytes(8), "nolabel.txt": b"no kind key", "nolabel.json": b'{"url": "x"}',
    }
    for name, data in broken.items():
        (src / "b" / name).parent.mkdir(exist_ok=True)
        (src / "b" / name).write_bytes(data)

    out = tmp_path / "out"
    stats = write_mds(folder_candidates(str(src), label_cols=("kind",)), str(out), label_columns=("kind",), workers=2)
    assert stats["written"] == 4
    assert stats["skipped"] == {
        "unreadable_image": 2, "empty_caption": 1, "non_utf8_caption": 1, "missing_caption": 1, "missing_image": 1,
        "missing_label": 1,
    }
    records = read_mds(out)
    assert [(r["id"], r["caption"], r["kind"]) for r in records] == [
        (f"a/x{i}.png", f"caption {i}", f"k{i}") for i in range(4)
    ]
    assert all(r["image"] == (src / r["id"]).read_bytes() for r in records)


# ---------------------------------------------------------------- tar (webdataset / img2dataset)


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(data))


def meta(key: str) -> bytes:
    return json.dumps({"key": key, "status": "success", "kind": f"kind-{key}"}).encode()


def test_tar_shards_from_glob_and_a_damaged_tar(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "part-00000.tar", [
        ("000", {"jpg": image_bytes(0, "JPEG"), "txt": b"first", "json": meta("000")}),
        ("001", {"png": image_bytes(1), "txt": b"second", "json": meta("001")}),
        ("002", {"jpg": truncated_jpeg(), "txt": b"truncated", "json": meta("002")}),
        ("003", {"jpg": NOT_AN_IMAGE, "txt": b"junk", "json": meta("003")}),
        ("004", {"jpg": image_bytes(4, "JPEG"), "txt": b"", "json": meta("004")}),
    ])
    write_tar(shards / "part-00001.tar", [
        ("005", {"jpg": image_bytes(5, "JPEG"), "txt": b"third", "json": meta("005")}),
        ("006", {"jpg": image_bytes(6, "JPEG"), "txt": b"\xc3\x28 invalid utf-8", "json": meta("006")}),
        ("007", {"jpg": image_bytes(7, "JPEG"), "json": meta("007")}),
        ("008", {"txt": b"caption without image", "json": meta("008")}),
    ])
    damaged = tmp_path / "damaged.tar"
    big = Image.effect_noise((256, 256), 64).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    write_tar(damaged, [
        ("009", {"jpg": image_bytes(9, "JPEG"), "txt": b"fourth", "json": meta("009")}),
        ("010", {"png": buf.getvalue(), "txt": b"cut off", "json": meta("010")}),
    ])
    data = damaged.read_bytes()
    damaged.write_bytes(data[: data.index(buf.getvalue()[:64]) + 1000])  # cut inside 010.png

    def convert(out):
        cands = tar_candidates([str(shards / "part-*.tar"), str(damaged)], label_cols=("kind",))
        return write_mds(cands, str(out), label_columns=("kind",), workers=2)

    stats = convert(tmp_path / "out")
    assert stats["written"] == 4
    assert stats["skipped"] == {
        "unreadable_image": 2, "empty_caption": 1, "non_utf8_caption": 1, "missing_caption": 1, "missing_image": 1,
        "unreadable_tar": 1,
    }
    assert rejects_of(tmp_path / "out")[-1]["source"] == "damaged.tar"
    convert(tmp_path / "again")
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "again")

    records = read_mds(tmp_path / "out")
    assert [(r["id"], r["caption"], r["kind"]) for r in records] == [
        ("000", "first", "kind-000"), ("001", "second", "kind-001"), ("005", "third", "kind-005"),
        ("009", "fourth", "kind-009"),
    ]
    assert records[1]["image"] == image_bytes(1)


def test_tar_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tar file matches"):
        tar_candidates([str(tmp_path / "nothing-*.tar")])
