"""A tiny, meaningful image-caption dataset drawn with PIL: coloured shapes whose captions name colour and shape,
so a student can really learn it in a few dozen steps. Written as a CSV + PNGs, converted by `kclip prepare csv`."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(color: str, shape: str, variant: int, size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    m = 4 + variant % 5
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=COLORS[color])
    return img


def write_shapes_csv(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (color, shape) in zip(range(n), itertools.cycle(itertools.product(COLORS, SHAPES))):
        name = f"img{i:04d}.png"
        draw(color, shape, i).save(folder / name)
        rows.append({"filepath": name, "title": f"a {color} {shape}", "color": color, "shape": shape})
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_shapes_mds(root: Path, n: int = 96) -> Path:
    """MDS dataset of n shape pairs at root/mds (labels `color`, `shape`)."""
    from kclip.data.cli import prepare_main

    out = root / "mds"
    if not (out / "index.json").is_file():
        csv_path = write_shapes_csv(root / "raw", n)
        assert prepare_main(["csv", "--src", str(csv_path), "--out", str(out), "--label-cols", "color,shape"]) == 0
    return out
