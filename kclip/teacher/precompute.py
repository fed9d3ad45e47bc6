"""Embed every training caption with the teacher once, before training, into the teacher cache (`kclip teacher-cache`).

Training fills the cache as it goes, so its first epoch pays for the teacher on every step and its later epochs miss
the samples the first one never drew (`drop_last`). This pass runs the same teacher with the same ZeRO-3 sharding and
the same cache key over the whole training set in index order (no images decoded), so that training starts with
every step a cache hit. It skips rows already cached, so an interrupted pass resumes where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from kclip import console, dist
from kclip.config import Config


def precompute(cfg: Config, run_dir: str | Path) -> dict:
    """Fill the cache `kclip train --output run_dir` with the same config would use (collective); returns counts."""
    from kclip.data.loader import build_caption_loader
    from kclip.teacher.cache import embed_cached, open_cache
    from kclip.teacher.load import build_teacher

    dist.init(cfg.dist.timeout_s, cfg.dist.rendezvous_timeout_s)
    teacher = build_teacher(cfg.teacher)
    cache = open_cache(cfg, teacher, run_dir)
    loader = build_caption_loader(cfg.data.train, batch_size=cfg.train.global_batch_size // dist.world_size(),
                                  tokenizer=teacher.tokenizer, max_len=cfg.teacher.max_len,
                                  num_workers=cfg.data.num_workers)
    start, truncated = time.perf_counter(), 0
    for batch in console.progress(len(loader), "teacher cache", "batch", iterable=loader):
        embed_cached(teacher, cache, batch)
        truncated += int(batch["truncated"].sum())
    totals = torch.tensor([cache.lookups - cache.hits, cache.hits, cache.corrupt_rows, truncated,
                           teacher.tokens_processed], dtype=torch.float64)
    dist.all_reduce_sum(totals)  # also a barrier: every rank's rows are written before they are counted
    computed, cached, corrupt, truncated, tokens = (int(v) for v in totals.tolist())
    # Streaming repeats a few samples to give ranks equal shares, so `computed` + `already_cached` can exceed `samples`.
    result = {"cache": str(cache.folder), "samples": len(cache.filled), "filled": int(cache.filled.sum()),
              "computed": computed, "already_cached": cached, "recomputed_corrupt": corrupt,
              "truncated_captions": truncated, "teacher_tokens": tokens,
              "seconds": round(time.perf_counter() - start, 1)}
    cache.close()
    return result
