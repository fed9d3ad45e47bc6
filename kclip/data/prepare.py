"""Write image-caption records into an MDS folder, skipping (never aborting on) bad records.

Every converter turns its input into `Candidate`s; `write_mds` checks them in parallel (image size from the header,
full image decode, UTF-8 caption, non-empty caption), writes the good ones in input order and explains every skipped
one:

    OUT/index.json, OUT/shard.NNNNN.mds.zstd   columns: id, image (original bytes), caption, one str per label
    OUT/stats.json                              written / skipped-by-reason counts, multi-frame images kept, caption
                                                length histogram (tokens)
    OUT/rejects.jsonl                           one line per skipped record: id, source, reason, detail

Everything is written into OUT.partial, renamed to OUT only once complete: an interrupted conversion leaves no OUT.
stats.json is written last, so it also marks a folder as complete for folders renamed by hand and for those written
before this staging existed (`kclip.config.preflight.check_mds` refuses a folder without it).

Output is a pure function of the input: checks run in a process pool but results are consumed in submission order,
and nothing time- or host-dependent is written, so re-running yields byte-identical files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from kclip.console import progress
from kclip.data.transforms import decode_checked
from kclip.tokenizers import load_tokenizer

BASE_COLUMNS = ("id", "image", "caption")
CHUNK = 64  # candidates per pool task: amortises inter-process overhead
# Caption length bins in tokens; 77 is CLIP's text context, so the histogram shows how much a 77-token tower truncates.
TOKEN_BIN_EDGES = (1, 9, 17, 33, 65, 78, 129, 257)
# 8192 x 8192 = 67 Mpx: above every common camera (61 Mpx), far above what a 224-pixel student can use. Decoding one
# image takes ~4 bytes per pixel of memory in every worker, and the loader decodes it again at every draw.
DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Candidate:
    """One input record before checking.

    image: a file path to read, the image bytes themselves (tar members, generated images), or None if missing.
    caption: text, raw bytes (decoded as UTF-8 during the check), or None if missing.
    problem: a reject reason the source already knows (e.g. a sidecar is missing); the record is skipped.
    """

    id: str
    source: str
    image: str | bytes | None
    caption: str | bytes | None
    labels: tuple[str, ...] = ()
    problem: str | None = None
    detail: str = field(default="", compare=False)


@dataclass(frozen=True)
class Checked:
    """A candidate after checking: `reason` is None for a good record, which then carries bytes, caption, length and
    whether its image has several frames."""

    candidate: Candidate
    reason: str | None
    detail: str = ""
    image: bytes = b""
    caption: str = ""
    n_tokens: int = 0
    multi_frame: bool = False


def _is_utf8(text: str) -> bool:
    """False for str holding undecodable bytes as surrogates (CSV rows and file names read with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeError:
        return False
    return True


def _check(c: Candidate, max_pixels: int) -> Checked:
    if c.problem:
        return Checked(c, c.problem, c.detail)
    if not all(_is_utf8(t) for t in (c.id, *c.labels)):
        return Checked(c, "non_utf8_metadata", "id or label is not valid UTF-8")
    if c.image is None:
        return Checked(c, "missing_image")
    if isinstance(c.image, str):
        try:
            with open(c.image, "rb") as f:
                image = f.read()
        except OSError as e:
            return Checked(c, "missing_image", f"{type(e).__name__}: {e.strerror or e}")
    else:
        image = c.image
    if c.caption is None:
        return Checked(c, "missing_caption")
    try:
        caption = c.caption.decode("utf-8") if isinstance(c.caption, bytes) else c.caption
    except UnicodeError:
        return Checked(c, "non_utf8_caption")
    if not _is_utf8(caption):
        return Checked(c, "non_utf8_caption")
    caption = caption.strip()
    if not caption:
        return Checked(c, "empty_caption")
    try:
        _, multi_frame = decode_checked(image, max_pixels)
    except Image.DecompressionBombError as e:  # over max_pixels, or over Pillow's own limit
        return Checked(c, "too_many_pixels", str(e))
    except Exception as e:  # noqa: BLE001 - PIL signals bad bytes with many exception types; all mean "skip"
        # Some messages embed object addresses ("<BytesIO object at 0x7f...>"), which would make rejects differ per run.
        return Checked(c, "unreadable_image", re.sub(r" at 0x[0-9a-f]+", "", f"{type(e).__name__}: {e}"))
    # A multi-frame image (animated GIF/PNG/WebP, a camera's MPO JPEG) is kept, and counted: every reader of the stored
    # bytes decodes its first frame the same way, which is usually what the caption shows (and an MPO's main picture),
    # so rejecting would drop usable pairs; the count lets a dataset that is mostly animations be noticed.
    return Checked(c, None, image=image, caption=caption, multi_frame=multi_frame)


def check_chunk(chunk: list[Candidate], tokenizer: str, max_pixels: int) -> list[Checked]:
    """Check candidates and count the tokens of the good captions (special tokens included, no truncation)."""
    checked = [_check(c, max_pixels) for c in chunk]
    good = [i for i, r in enumerate(checked) if r.reason is None]
    if good:
        lengths = [len(ids) for ids in load_tokenizer(tokenizer)([checked[i].caption for i in good])["input_ids"]]
        for i, n in zip(good, lengths):
            checked[i] = dataclasses.replace(checked[i], n_tokens=n)
    return checked


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` over a process pool with results in input order and a bounded number of tasks in flight, so
    memory stays flat however long `items` is. workers <= 1 runs in this process."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, initializer=_ignore_sigint) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _ignore_sigint() -> None:
    """Ctrl-C reaches every process of the terminal's group: workers leave it to the parent, which stops the
    conversion in one line, instead of each printing its own KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _token_stats(lengths: list[int], tokenizer: str) -> dict:
    counts = Counter(int(np.searchsorted(TOKEN_BIN_EDGES, n, side="right")) - 1 for n in lengths)
    names = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(TOKEN_BIN_EDGES)] + [f"{TOKEN_BIN_EDGES[-1]}+"]
    arr = np.asarray(lengths or [0])
    return {
        "tokenizer": tokenizer,
        "histogram": {name: counts.get(i, 0) for i, name in enumerate(names)},
        "mean": round(float(arr.mean()), 3),
        "p50": int(np.percentile(arr, 50)),
        "p95": int(np.percentile(arr, 95)),
        "max": int(arr.max()),
    }


def _unique(sample_id: str, seen: Counter) -> str:
    """Ids must be unique: a repeated id (one image with several captions in a CSV) gets a `#k` suffix."""
    seen[sample_id] += 1
    return sample_id if seen[sample_id] == 1 else f"{sample_id}#{seen[sample_id] - 1}"


def check_output_dir(out: str) -> None:
    """Before converting: `out` is renamed onto only at the end, so a wrong one must fail before any work is done."""
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"output folder is not empty (remove it first): {out}")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"output exists and is not a folder: {out}")


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """Yield `OUT.partial` to write into; it becomes `out` (which must be empty or absent) only when the body completes.
    An error or Ctrl-C removes it; a killed process leaves it under that name, never as a folder at `out`."""
    out = os.path.realpath(out)  # through symlinks: the rename must stay on the filesystem that holds `out`
    check_output_dir(out)
    partial = out + ".partial"
    try:
        os.makedirs(partial)
    except FileExistsError:
        raise FileExistsError(f"{partial} exists: another `kclip prepare` is writing {out}, or one was killed "
                              "(remove it first)") from None
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out)  # replaces an empty `out` folder too


def write_stats(folder: str, stats: dict) -> None:
    """stats.json; written last, it marks `folder` as a complete dataset (`written` = the samples in index.json)."""
    with open(os.path.join(folder, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")


def write_mds(
    candidates: Iterable[Candidate],
    out: str,
    *,
    label_columns: tuple[str, ...] = (),
    tokenizer: str = "byte",
    workers: int = 1,
    size_limit: int = 1 << 26,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    desc: str = "prepare",
    total: int | None = None,
) -> dict:
    """Check and write `candidates` to the MDS folder `out` (must be empty or absent); return the stats dict.
    `total`, the number of candidates if known, gives the progress bar its ETA."""
    label_columns = tuple(label_columns)
    clash = set(label_columns) & set(BASE_COLUMNS)
    if clash or len(set(label_columns)) != len(label_columns):
        raise ValueError(f"label columns must be distinct and not named id/image/caption: {list(label_columns)}")
    load_tokenizer(tokenizer)  # fail fast on a bad spec; forked workers inherit the cached tokenizer
    with staged_output(out) as partial:
        stats = _write_records(candidates, partial, label_columns, tokenizer, workers, size_limit, max_pixels, desc,
                               total)
        write_stats(partial, stats)
    return stats


def _write_records(
    candidates: Iterable[Candidate], out: str, label_columns: tuple[str, ...], tokenizer: str, workers: int,
    size_limit: int, max_pixels: int, desc: str, total: int | None,
) -> dict:
    """Shards, index.json and rejects.jsonl in `out`; return the stats."""
    from streaming import (
        MDSWriter,  # imports torch: here, not at the top, so `kclip prepare --help` answers at once
    )

    columns = {"id": "str", "image": "bytes", "caption": "str", **{c: "str" for c in label_columns}}
    skipped, lengths, seen, multi_frame = Counter(), [], Counter(), 0
    chunks = _chunks(candidates, CHUNK)
    check = functools.partial(check_chunk, tokenizer=tokenizer, max_pixels=max_pixels)
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=size_limit) as writer, open(
        os.path.join(out, "rejects.jsonl"), "w", encoding="utf-8"
    ) as rejects, progress(total, desc, "rec") as bar:
        for checked in ordered_map(check, chunks, workers):
            for r in checked:
                c = r.candidate
                if r.reason is None:
                    sample = {"id": _unique(c.id, seen), "image": r.image, "caption": r.caption}
                    sample.update(zip(label_columns, c.labels))
                    writer.write(sample)
                    lengths.append(r.n_tokens)
                    multi_frame += r.multi_frame
                else:
                    skipped[r.reason] += 1
                    line = {"id": c.id, "source": c.source, "reason": r.reason, "detail": r.detail}
                    rejects.write(json.dumps(line) + "\n")  # ASCII-escaped: ids may hold undecodable bytes
            bar.update(len(checked))
    return {
        "written": len(lengths),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "multi_frame": multi_frame,
        "columns": list(columns),
        "caption_tokens": _token_stats(lengths, tokenizer),
    }

