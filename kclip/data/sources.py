"""Input formats turned into `Candidate` records, in a deterministic order.

- CSV/TSV: one row per record; image paths relative to the CSV's folder (open_clip's `filepath`/`title` layout). A
  row the csv module cannot read (a field over CSV_FIELD_LIMIT) is one "unreadable_row" reject; reading goes on.
- folder: `x.jpg|png|...` with a `x.txt` caption sidecar and optional `x.json` metadata, walked in sorted path order.
- tar: webdataset shards as img2dataset writes them (`key.jpg` + `key.txt` + `key.json`), in the order given.

Sources only read; every judgement about a record's validity (besides what only the source can see, like a missing
sidecar) happens in `prepare.write_mds`. Label values come from CSV columns or from the JSON metadata; a record
lacking one of the requested labels is skipped ("missing_label"), so label-based evaluations never see blanks.
Reject sources use file basenames so the output does not depend on where the input lives.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from collections.abc import Iterator

from kclip.data.prepare import Candidate

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
# Characters per CSV field. The csv module's default, 131,072, made one long caption abort the whole conversion. Far
# beyond any caption, the limit still bounds what one broken row (an unclosed quote swallowing the lines after it)
# reads into memory.
CSV_FIELD_LIMIT = 1 << 24


def _labels_from_json(raw: bytes | None, label_cols: tuple[str, ...]) -> tuple[tuple[str, ...], str | None, str]:
    """(labels, problem, detail) for the JSON metadata of one record."""
    if not label_cols:
        return (), None, ""
    if raw is None:
        return (), "missing_label", "no .json metadata"
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeError) as e:
        return (), "bad_metadata", f"{type(e).__name__}: {e}"
    if not isinstance(meta, dict):
        return (), "bad_metadata", "metadata is not a JSON object"
    absent = [c for c in label_cols if meta.get(c) is None]
    if absent:
        return (), "missing_label", f"no {absent} in metadata"
    return tuple(str(meta[c]) for c in label_cols), None, ""


def _open_csv(src: str):
    """The CSV file as text, under CSV_FIELD_LIMIT (the csv module's limit is global: set it at every read).
    surrogateescape: a row with invalid UTF-8 becomes one "non_utf8_caption" reject instead of failing the file."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return open(src, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _delimiter(sep: str, header: str) -> str:
    if sep != "auto":
        return {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    return "\t" if "\t" in header else ","


def csv_candidates(
    src: str,
    *,
    image_col: str = "filepath",
    caption_col: str = "title",
    label_cols: tuple[str, ...] = (),
    sep: str = "auto",
) -> Iterator[Candidate]:
    """Checks the header now (a wrong column name fails before any output exists), then yields rows lazily."""
    with _open_csv(src) as f:
        delimiter = _delimiter(sep, f.readline())
        f.seek(0)
        fields = next(csv.reader(f, delimiter=delimiter), [])
    absent = [c for c in (image_col, caption_col, *label_cols) if c not in fields]
    if absent:
        raise ValueError(f"{src}: no column(s) {absent}; columns are {fields} (delimiter {delimiter!r})")
    return _csv_rows(src, delimiter, image_col, caption_col, label_cols)


def _csv_rows(
    src: str, delimiter: str, image_col: str, caption_col: str, label_cols: tuple[str, ...]
) -> Iterator[Candidate]:
    root = os.path.dirname(os.path.abspath(src))
    name = os.path.basename(src)
    with _open_csv(src) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                # The reader has dropped the rest of the record and goes on with the next line. line_num still counts
                # the lines before this record, so the record starts one line further.
                source = f"{name}:{reader.line_num + 1}"
                yield Candidate(source, source, None, None, problem="unreadable_row", detail=f"csv.Error: {e}")
                continue
            path = row[image_col]
            source = f"{name}:{reader.line_num}"
            labels = tuple(row[c] for c in label_cols)
            problem = "missing_label" if any(v is None for v in labels) else None
            yield Candidate(
                id=path or source,
                source=source,
                image=os.path.join(root, path) if path else None,
                caption=row[caption_col],
                labels=() if problem else labels,
                problem=problem,
            )


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def folder_candidates(src: str, *, label_cols: tuple[str, ...] = ()) -> Iterator[Candidate]:
    """Images with sidecars; a caption sidecar without any image is reported as "missing_image"."""
    if not os.path.isdir(src):
        raise NotADirectoryError(f"not a folder: {src}")
    return _folder_records(src, label_cols)


def _folder_files(src: str) -> tuple[list[str], set[str]]:
    """Every file under `src` (relative, sorted) and the stems that have an image."""
    files = sorted(
        os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/") for d, _, names in os.walk(src) for f in names
    )
    return files, {f.rsplit(".", 1)[0] for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS}


def count_folder_records(src: str) -> int:
    """How many candidates `folder_candidates` yields (images, and captions without one), from the listing alone."""
    files, stems_with_image = _folder_files(src)
    images = sum(f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for f in files)
    return images + sum(f.endswith(".txt") and f[: -len(".txt")] not in stems_with_image for f in files)


def _folder_records(src: str, label_cols: tuple[str, ...]) -> Iterator[Candidate]:
    files, stems_with_image = _folder_files(src)
    for rel in files:
        stem, _, ext = rel.rpartition(".")
        ext = ext.lower()
        if ext == "txt" and stem not in stems_with_image:
            yield Candidate(id=rel, source=rel, image=None, caption=None, problem="missing_image")
        if ext not in IMAGE_EXTS:
            continue
        labels, problem, detail = _labels_from_json(_read(os.path.join(src, stem + ".json")), label_cols)
        yield Candidate(
            id=rel,
            source=rel,
            image=os.path.join(src, rel),
            caption=_read(os.path.join(src, stem + ".txt")),
            labels=labels,
            problem=problem,
            detail=detail,
        )


def expand_tar_sources(patterns: list[str]) -> list[str]:
    """Globs expand to their sorted matches; explicit paths must exist. Order of the arguments is kept."""
    paths = []
    for p in patterns:
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"no tar file matches {p}")
            paths += matches
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise FileNotFoundError(f"tar file does not exist: {p}")
    return paths


def _tar_key(name: str) -> tuple[str, str]:
    """(key, extension): as in webdataset, the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_candidate(key: str, source: str, files: dict[str, bytes], label_cols: tuple[str, ...]) -> Candidate:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    labels, problem, detail = _labels_from_json(files.get("json"), label_cols)
    return Candidate(key, source, image, files.get("txt"), labels, problem, detail)


def tar_candidates(patterns: list[str], *, label_cols: tuple[str, ...] = ()) -> Iterator[Candidate]:
    """Stream each tar once; a sample's files are adjacent in webdataset shards, so memory holds one sample.
    A damaged tar yields the samples before the damage, then one "unreadable_tar" reject, and conversion goes on."""
    return _tar_records(expand_tar_sources(patterns), label_cols)


def count_tar_records(patterns: list[str]) -> int:
    """About how many candidates `tar_candidates` yields, from the members' headers: an uncompressed tar is read header
    by header, seeking past the files; a compressed one is decompressed once more. A damaged tar counts its samples
    up to the damage and its reject."""
    total = 0
    for path in expand_tar_sources(patterns):
        last = None
        try:
            with tarfile.open(path, mode="r:*") as tf:
                for member in tf:
                    key = _tar_key(member.name)[0]
                    if member.isfile() and key != last:
                        total, last = total + 1, key
        except (tarfile.TarError, OSError, EOFError):
            total += 1
    return total


def _tar_records(paths: list[str], label_cols: tuple[str, ...]) -> Iterator[Candidate]:
    for path in paths:
        name = os.path.basename(path)
        key, files = None, {}
        try:
            with tarfile.open(path, mode="r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    member_key, ext = _tar_key(member.name)
                    # Emit a sample as soon as the next key starts, before reading on: damage further in the
                    # tar must not cost the samples already complete.
                    if member_key != key and files:
                        yield _tar_candidate(key, f"{name}:{key}", files, label_cols)
                        files = {}
                    key = member_key
                    files[ext] = tf.extractfile(member).read()
            if files:
                yield _tar_candidate(key, f"{name}:{key}", files, label_cols)
        except (tarfile.TarError, OSError, EOFError) as e:
            where = f" in sample {key}" if key else ""
            yield Candidate(name, name, None, None, problem="unreadable_tar", detail=f"{type(e).__name__}{where}: {e}")
