"""The Twemoji demo dataset: real images, labels, a split without leakage between skin-tone variants."""
from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from PIL import Image

from kclip.data.cli import prepare_main

SKIN_TONE_MODIFIERS = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}


def base(sample_id: str) -> str:
    """Independent of kclip.data.demo: drop the skin-tone modifier codepoints from the file key."""
    return "-".join(p for p in sample_id.split("-") if p not in SKIN_TONE_MODIFIERS) or sample_id


def read_mds(folder) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(folder), shuffle=False)
    return [ds[i] for i in range(ds.num_samples)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "emoji"
    assert prepare_main(["demo", "--out", str(out), "--workers", "2"]) == 0
    return out


SPLITS = ("train", "val", "test")


def test_demo_split_keeps_skin_tone_variants_together(demo):
    records = {split: read_mds(demo / split) for split in SPLITS}
    bases = {split: {base(r["id"]) for r in rows} for split, rows in records.items()}
    assert not bases["train"] & bases["val"] and not bases["train"] & bases["test"] and not bases["val"] & bases["test"]
    total = sum(len(rows) for rows in records.values())
    assert total > 3500
    for held_out in ("val", "test"):
        assert 0.09 <= len(records[held_out]) / total <= 0.15, held_out
        # the split really groups variants: some base has several files (skin tones) on the held-out side
        assert max(Counter(base(r["id"]) for r in records[held_out]).values()) >= 5


def test_demo_records_have_labels_captions_and_rgb_images(demo):
    records = [r for split in SPLITS for r in read_mds(demo / split)]
    assert set(records[0]) == {"id", "image", "caption", "category", "subcategory"}
    assert all(r["category"] and r["subcategory"] for r in records)
    assert 8 <= len({r["category"] for r in records}) <= 12
    assert len({r["subcategory"] for r in records}) >= 80
    by_id = {r["id"]: r for r in records}
    assert "grinning face" in by_id["1f600"]["caption"] and by_id["1f600"]["category"] == "Smileys & Emotion"
    assert "skin tone" in by_id["1f44b-1f3fd"]["caption"]  # waving hand, medium skin tone
    white_corners = 0
    for r in records[::25]:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (72, 72)
        white_corners += img.getpixel((0, 0)) == (255, 255, 255)
    assert white_corners >= 0.9 * len(records[::25])  # transparency was composited onto white, not black


def test_demo_writes_stats_and_attribution(demo):
    for split in SPLITS:
        stats = json.loads((demo / split / "stats.json").read_text())
        assert stats["written"] > 0 and set(stats["skipped"]) <= {"no_metadata"}
        assert sum(stats["caption_tokens"]["histogram"].values()) == stats["written"]
    text = (demo / "ATTRIBUTION.md").read_text()
    assert "CC-BY 4.0" in text and "https://creativecommons.org/licenses/by/4.0/" in text and "Twitter, Inc" in text
