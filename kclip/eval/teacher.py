"""The teacher `kclip eval` compares a student with (the kNN probe, the caption probe's teacher row): the run's, found
from wherever the evaluation runs, or one given; and its embeddings of the probes' captions, kept in the user's cache.

A study evaluates many students on the same split against the same teacher: loading the teacher took about 30 s of
each such evaluation on the demo, embedding its few hundred captions a second. A cached list is found by its key: the
teacher's fingerprint (everything that determines its embeddings, `teacher_fingerprint`, which reads the teacher's
config and tokenizer but not its weights) and the caption list itself, in order.

Layout: `$KCLIP_CACHE/eval_teacher/<key>.pt`, float32 [n, h] (KCLIP_CACHE: see kclip.gguf_files.cache_root). Rank 0
writes a file under a temporary name and renames it, so a reader finds it whole or not at all; one that does not read
back as n finite rows is recomputed and rewritten.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kclip import dist
from kclip.config import ConfigError, TeacherConfig
from kclip.eval.knn_overlap import teacher_embeddings
from kclip.gguf_files import cache_root

if TYPE_CHECKING:
    from kclip.export.load import LoadedModel

log = logging.getLogger(__name__)


def teacher_config(loaded: LoadedModel, path: str | None):
    """The teacher settings for the kNN probe: the run's (if it trained with one), with `path` replacing its model."""
    if path is None and not loaded.cfg.needs_teacher:
        return None
    cfg = copy.deepcopy(loaded.cfg.teacher)
    if path is not None:
        cfg.path, cfg.random_config = path, None
    elif cfg.path is not None:
        cfg.path = run_teacher_path(cfg.path, Path(loaded.source))
    return cfg


def caption_teacher_config(loaded: LoadedModel, path: str | None):
    """The teacher for the caption probe's teacher row when the kNN probe is skipped: as teacher_config, None (the
    row left out, one log line) when the run's teacher cannot be found here."""
    try:
        return teacher_config(loaded, path)
    except ConfigError as e:
        log.info("caption EM: no teacher row (%s)", e)
        return None


def run_teacher_path(path: str, source: Path) -> str:
    """The run's teacher.path as it reads from here. A relative one was read from the directory the run was launched
    in, which the run does not record; a run folder usually lies below it (`--output runs/NAME`), so it is looked for
    from here, then from `source` (the checkpoint or export read) and each folder above it, nearest first."""
    if os.path.exists(path):
        return path
    start = source.absolute()
    if not os.path.isabs(path):
        for folder in (start, *start.parents):
            if (folder / path).exists():
                log.info("teacher.path: %s (the run's) is not here; using %s", path, folder / path)
                return str(folder / path)
    where = "" if os.path.isabs(path) else f" (relative: looked for from {os.getcwd()}, {start} and every folder above)"
    raise ConfigError(f"teacher.path: the run's teacher {path} is not found{where}; pass --teacher PATH for the kNN "
                      f"probe, or --skip knn")


def cache_path(fingerprint: str, captions: list[str]) -> Path:
    h = hashlib.sha256(fingerprint.encode())
    for caption in captions:  # length-prefixed: no two different lists hash the same bytes
        data = caption.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return cache_root() / "eval_teacher" / f"{h.hexdigest()[:32]}.pt"


def _read(path: Path, rows: int) -> torch.Tensor | None:
    try:
        emb = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged file is a miss, whatever torch.load makes of it
        log.warning("teacher embeddings: %s does not read back (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    if not (isinstance(emb, torch.Tensor) and emb.dim() == 2 and len(emb) == rows and emb.isfinite().all()):
        log.warning("teacher embeddings: %s does not hold %d finite rows; recomputing", path, rows)
        return None
    return emb


def _write(path: Path, emb: torch.Tensor) -> None:
    """Best effort: a cache that cannot be written costs the next evaluation a teacher load, not this one its result."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(emb.float().contiguous(), partial)
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        log.warning("teacher embeddings: cannot write %s (%s); the next evaluation loads the teacher again", path, e)


def caption_embeddings(cfg: TeacherConfig, caption_lists: list[list[str]]) -> list[torch.Tensor]:
    """[n_i, h] teacher embeddings of each caption list, on every rank: from the cache when every rank finds every
    list there, else from the teacher, loaded once (collectively: all ranks must call this) and cached."""
    from kclip.teacher.load import build_teacher, teacher_fingerprint

    paths = [cache_path(teacher_fingerprint(cfg), captions) for captions in caption_lists]
    cached = [_read(path, len(captions)) for path, captions in zip(paths, caption_lists)]
    # One decision for all ranks: a sharded teacher is loaded and run by every rank together, and a node whose
    # cache lacks a list (node-local caches) would otherwise wait alone in the teacher's collectives.
    if not dist.all_reduce_max(int(any(emb is None for emb in cached))):
        log.info("teacher embeddings: %d caption list(s) read from %s", len(paths), paths[0].parent)
        return cached
    teacher = build_teacher(cfg)
    out = [teacher_embeddings(teacher, captions) for captions in caption_lists]
    if dist.is_main():
        for path, emb in zip(paths, out):
            _write(path, emb)
    return out
