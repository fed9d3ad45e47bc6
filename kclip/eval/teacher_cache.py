"""The teacher's embeddings of the captions `kclip eval` compares a student with (the kNN probe, the caption probe's
teacher row), kept in the user's cache.

A study evaluates many students on the same split against the same teacher: loading the teacher took about 30 s of
each such evaluation on the demo, embedding its few hundred captions a second. A cached list is found by its key: the
teacher's fingerprint (everything that determines its embeddings, `teacher_fingerprint`, which reads the teacher's
config and tokenizer but not its weights) and the caption list itself, in order.

Layout: `$KCLIP_CACHE/eval_teacher/<key>.pt`, float32 [n, h] (KCLIP_CACHE: see kclip.gguf_files.cache_root). Rank 0
writes a file under a temporary name and renames it, so a reader finds it whole or not at all; one that does not read
back as n finite rows is recomputed and rewritten.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from kclip import dist
from kclip.config import TeacherConfig
from kclip.eval.knn_overlap import teacher_embeddings
from kclip.gguf_files import cache_root

log = logging.getLogger(__name__)


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
