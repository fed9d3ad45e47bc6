"""On-disk cache of teacher embeddings, so later epochs skip the teacher for captions it has already embedded.

A frozen teacher gives a caption the same embedding every epoch, and the teacher is the most expensive part of a
step, so after the first epoch the cache removes most of its cost.

Layout: `<cache_dir>/<key>/<hostname>/` with `meta.json`, `emb.f32` (memmap [N, D], row = dataset sample index) and
`filled.u8` (1 where the row holds an embedding). `key` hashes the teacher fingerprint (model, weights, layer,
pooling, normalisation, max_len, tokenizer) and the dataset's index.json, so a different teacher or dataset gets a
different folder and is never silently served stale rows. Ranks of one node share the files: each writes only rows
it computed itself. Nodes keep separate files, so a sample first embedded on another node is a miss here. Rows are flushed before each checkpoint; a row computed after the last checkpoint by a killed
run is still the teacher's embedding of that caption, so reusing it is correct.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch

from kclip import dist


class TeacherCache:
    def __init__(self, cache_dir: str | Path, *, teacher_fingerprint: str, dataset_dir: str, num_samples: int, dim: int):
        index_bytes = (Path(dataset_dir) / "index.json").read_bytes()
        key = hashlib.sha256(teacher_fingerprint.encode() + index_bytes).hexdigest()[:16]
        # One folder per node: ranks of a node share a page cache, so their memmap writes to different rows stay
        # coherent; across nodes on a shared filesystem they would not (a flushed page can carry another node's
        # stale copy of neighbouring rows), so nodes never share files.
        self.folder = Path(cache_dir) / key / socket.gethostname()
        self.meta = {"teacher": teacher_fingerprint, "dataset": str(Path(dataset_dir).resolve()),
                     "num_samples": num_samples, "dim": dim, "dtype": "float32"}
        # One process per node creates or repairs the files; the others wait, then map them.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            self._create_or_validate()
        dist.barrier()
        self.emb = np.memmap(self.folder / "emb.f32", dtype=np.float32, mode="r+", shape=(num_samples, dim))
        self.filled = np.memmap(self.folder / "filled.u8", dtype=np.uint8, mode="r+", shape=(num_samples,))
        self.hits = 0
        self.lookups = 0

    def _create_or_validate(self) -> None:
        meta_path = self.folder / "meta.json"
        n, d = self.meta["num_samples"], self.meta["dim"]
        sizes_ok = ((self.folder / "emb.f32").is_file() and (self.folder / "emb.f32").stat().st_size == n * d * 4
                    and (self.folder / "filled.u8").is_file() and (self.folder / "filled.u8").stat().st_size == n)
        if meta_path.is_file() and sizes_ok:
            try:
                if json.loads(meta_path.read_text()) == self.meta:
                    return
            except json.JSONDecodeError:
                pass
        # Missing, truncated or from another teacher/dataset: rebuild from nothing rather than trust any row.
        self.folder.mkdir(parents=True, exist_ok=True)
        np.memmap(self.folder / "emb.f32", dtype=np.float32, mode="w+", shape=(n, d)).flush()
        np.memmap(self.folder / "filled.u8", dtype=np.uint8, mode="w+", shape=(n,)).flush()
        meta_path.write_text(json.dumps(self.meta, indent=1))

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, D] with zeros where missing, hit mask [B])."""
        idx = index.cpu().numpy()
        hit = torch.from_numpy(self.filled[idx].astype(bool))
        self.lookups += len(idx)
        self.hits += int(hit.sum())
        return torch.from_numpy(np.array(self.emb[idx])), hit

    def store(self, index: torch.Tensor, emb: torch.Tensor) -> None:
        idx = index.cpu().numpy()
        self.emb[idx] = emb.detach().float().cpu().numpy()
        self.filled[idx] = 1

    def flush(self) -> None:
        self.emb.flush()
        self.filled.flush()

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.lookups)


def embed_cached(teacher, cache: TeacherCache | None, batch: dict) -> torch.Tensor:
    """Teacher embeddings for a batch, from the cache where present. Collective when the teacher is sharded:
    `teacher.embed` runs on every rank even with zero misses, and equalises forward counts itself."""
    ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    if cache is None:
        return teacher.embed(ids, mask)
    emb, hit = cache.lookup(batch["index"])
    miss = ~hit
    fresh = teacher.embed(ids[miss], mask[miss])
    cache.store(batch["index"][miss], fresh)
    emb = emb.to(fresh.device)
    emb[miss.to(fresh.device)] = fresh
    return emb
