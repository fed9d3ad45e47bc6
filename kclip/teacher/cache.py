"""On-disk cache of teacher embeddings, so later epochs skip the teacher for captions it has already embedded.

A frozen teacher gives a caption the same embedding every epoch, and the teacher is the most expensive part of a
step, so after the first epoch the cache removes most of its cost.

Layout: `<cache_dir>/<key>/node<i>/` with `meta.json`, `emb.f32` (memmap [N, D], row = dataset sample index; `emb.bf16`
or `emb.f16` with `teacher.cache_dtype` bf16 or fp16, half the size), `filled.u8` (1 where the row holds an embedding),
`crc32.u32` (the CRC-32 of each row's stored bytes) and `lock`. `key` hashes the teacher fingerprint (model, weights,
layer, pooling, normalisation, max_len, tokenizer), the dataset's index.json and the storage dtype, so a different
teacher, dataset or dtype gets a different folder and is never silently served stale rows, nor rows read in another
format.

Every node keeps a full copy: ranks of one node share its files (one page cache keeps their writes coherent), while
two nodes writing one file through a shared filesystem would not be coherent (a flushed page can carry another node's
stale copy of neighbouring rows). On more than one node, the embeddings each step computes are all-gathered so every
node stores every row, and a sample is a hit in epoch 2 whichever node it lands on. Folders are named by node index,
not hostname, so a requeued job on other machines finds its cache again; a job holds a lock on its folders, and a
second job sharing `cache_dir` at the same time takes the next free slot (`node<i>-2`, ...) instead.
Rows are flushed before each checkpoint; a row computed after the last checkpoint by a killed run is still the
teacher's embedding of that caption, so reusing it is correct.

The files get all their disk blocks when they are created (a cache written sparse by an older kclip, when it is next
opened): a sparse memmap gets a block when a page is first written, and on a full disk that write kills the process
with SIGBUS, without a word, in the middle of training.
Rows marked filled are checked as they are read, against their checksum and by `TeacherCache.intact`: a damaged one
(random bytes from a failing disk, zeros from a page lost in a crash, a write torn part way) is a miss, recomputed by
the teacher, overwritten and counted. A cache of an older format (`meta.json`'s "format"; before 2, no checksums) is
rebuilt, with one warning.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from kclip import dist
from kclip.config.preflight import NO_SPACE_ERRNOS, mds_num_samples

log = logging.getLogger(__name__)

MAX_SLOTS = 64
# meta.json's "format": 2 added the row checksums. An older cache's rows cannot be vouched for, so it is rebuilt.
FORMAT = 2
# teacher.cache_dtype -> the embedding file's name, its numpy dtype, and the torch dtype rows are rounded to. numpy has
# no bfloat16: bf16 rows are stored as their 16 bits (the upper half of the float32) and reinterpreted through torch.
STORAGE = {
    "fp32": ("emb.f32", np.float32, torch.float32),
    "bf16": ("emb.bf16", np.uint16, torch.bfloat16),
    "fp16": ("emb.f16", np.float16, torch.float16),
}


class TeacherCacheError(RuntimeError):
    pass


class TeacherCache:
    def __init__(self, cache_dir: str | Path, *, teacher_fingerprint: str, dataset_dir: str, num_samples: int, dim: int,
                 unit_norm: bool, dtype: str = "fp32"):
        index_bytes = (Path(dataset_dir) / "index.json").read_bytes()
        # fp32 adds nothing to the key, so caches written before teacher.cache_dtype existed keep their folder.
        dtype_salt = b"" if dtype == "fp32" else dtype.encode()
        key = hashlib.sha256(teacher_fingerprint.encode() + index_bytes + dtype_salt).hexdigest()[:16]
        self.dtype = dtype
        emb_name, storage, rounded = STORAGE[dtype]
        self.meta = {"format": FORMAT, "teacher": teacher_fingerprint, "dataset": str(Path(dataset_dir).resolve()),
                     "num_samples": num_samples, "dim": dim, "dtype": str(rounded).removeprefix("torch.")}
        # One process per node picks a slot, creates or repairs its files and holds its lock; the others wait, then
        # map the same files.
        self._lock_file = None
        claim = None
        if dist.local_rank() == 0:
            try:
                claim = self._claim_slot(Path(cache_dir) / key)
            except OSError as e:  # unwritable or full cache_dir: every rank must hear of it, not wait for it
                claim = TeacherCacheError(f"teacher cache: cannot create {cache_dir}: {e}")
            except TeacherCacheError as e:
                claim = e
        self.folder = Path(_from_node_leader(claim))
        self.emb = np.memmap(self.folder / emb_name, dtype=storage, mode="r+", shape=(num_samples, dim))
        self.filled = np.memmap(self.folder / "filled.u8", dtype=np.uint8, mode="r+", shape=(num_samples,))
        self.checksums = np.memmap(self.folder / "crc32.u32", dtype=np.uint32, mode="r+", shape=(num_samples,))
        self.unit_norm = unit_norm  # the teacher normalises: every row it stores has norm 1
        self.norm_tolerance = norm_tolerance(dtype)
        self.hits = 0
        self.lookups = 0
        self.corrupt_rows = 0  # rows marked filled that failed their checksum or `intact` and were served as misses

    def _claim_slot(self, root: Path) -> str:
        """The first of node<i>, node<i>-2, ... whose lock is free; its files created or validated."""
        node = dist.node_index()
        for n in range(1, MAX_SLOTS + 1):
            folder = root / (f"node{node}" if n == 1 else f"node{node}-{n}")
            folder.mkdir(parents=True, exist_ok=True)
            lock_file = open(folder / "lock", "a+")  # noqa: SIM115 - held open for the cache's lifetime
            try:
                # POSIX record locks: per process (re-opening the cache in one process is fine) and supported by
                # NFS's lock manager, unlike flock on some mounts.
                fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock_file.close()
                continue
            self._lock_file = lock_file
            self._create_or_validate(folder)
            return str(folder)
        raise TeacherCacheError(f"teacher cache: all {MAX_SLOTS} slots for node {node} under {root} are locked by other jobs")

    def _create_or_validate(self, folder: Path) -> None:
        meta_path = folder / "meta.json"
        n, d = self.meta["num_samples"], self.meta["dim"]
        emb_name, storage, _ = STORAGE[self.dtype]
        sizes = {folder / emb_name: n * d * np.dtype(storage).itemsize, folder / "filled.u8": n,
                 folder / "crc32.u32": 4 * n}
        sizes_ok = all(path.is_file() and path.stat().st_size == size for path, size in sizes.items())
        saved = _read_meta(meta_path)
        if saved == self.meta and sizes_ok:
            for path, size in sizes.items():  # files created sparse, before kclip allocated them
                _allocate(path, size, fresh=False)
            return
        if saved is not None and saved.get("format", 1) != FORMAT:
            log.warning("teacher cache: %s is in format %s, this kclip reads format %d: rebuilding it (its rows are "
                        "recomputed as they are needed)", folder, saved.get("format", 1), FORMAT)
        # Missing, truncated, of another format or from another teacher/dataset/dtype: rebuild from nothing rather
        # than trust any row.
        # meta.json goes first and comes back last, so a rebuild cut short is never taken for a whole cache.
        meta_path.unlink(missing_ok=True)
        for path, size in sizes.items():
            _allocate(path, size, fresh=True)
        meta_path.write_text(json.dumps(self.meta, indent=1))

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, D] with zeros where missing, hit mask [B]). A filled row that fails its checksum or is not
        `intact` is missing: the caller recomputes it and `store` overwrites it."""
        idx = index.cpu().numpy()
        stored = self.emb[idx]
        emb = decode_rows(stored, self.dtype)
        filled = self.filled[idx].astype(bool)
        hit = filled & (row_checksums(stored) == self.checksums[idx]) & self.intact(emb)
        emb[~hit] = 0
        self.corrupt_rows += int((filled & ~hit).sum())
        self.lookups += len(idx)
        self.hits += int(hit.sum())
        return torch.from_numpy(emb), torch.from_numpy(hit)

    def intact(self, rows: np.ndarray) -> np.ndarray:
        """Per row of `rows` [B, D] (float32, as `decode_rows` gives them): whether it can be an embedding the teacher
        stored. The row's checksum finds any damage to its bytes; this also refuses what no stored embedding holds,
        should damage happen to match the checksum (a 1-in-2^32 chance). One squared norm per row, summed in float32,
        shows the usual damage: NaN or inf; zeros (a page lost in a crash); random bytes, whose exponents put some
        element above ~1e19, so that the sum overflows (as float32 or bfloat16; as float16, whose largest value is
        65504, a random row holds a NaN or inf unless all its D elements miss a 1-in-32 chance, and fp16 caches only
        serve normalising teachers, whose norm check finds the rest). A normalising teacher's rows must also have norm 1
        (within `norm_tolerance`), which finds rows torn part way too."""
        sq = np.einsum("ij,ij->i", rows, rows)
        ok = np.isfinite(sq) & (sq > 0)
        return ok & (np.abs(sq - 1) < self.norm_tolerance) if self.unit_norm else ok

    def store(self, index: torch.Tensor, emb: torch.Tensor) -> None:
        idx = index.cpu().numpy()
        rows = encode_rows(emb, self.dtype)
        self.emb[idx] = rows
        self.checksums[idx] = row_checksums(rows)
        self.filled[idx] = 1

    def rounded(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` as this cache serves them back once stored (rounded to its dtype), so that the epoch that computes a
        row trains on the same target as the epochs that read it."""
        return rows.to(STORAGE[self.dtype][2]).to(rows.dtype)

    def store_everywhere(self, index: torch.Tensor, emb: torch.Tensor) -> None:
        """Collective on more than one node: store rows this rank computed, and rows other nodes computed, so that
        every node's copy gets every row. Each rank writes the rows of the ranks with its local rank, so on every
        node each row is written exactly once."""
        if dist.num_nodes() == 1:
            self.store(index, emb)
            return
        source = torch.full_like(index, dist.rank())
        rows = dist.all_gather_rows(torch.stack([index.cpu(), source.cpu()], dim=1))
        embs = dist.all_gather_rows(emb.detach().float())
        mine = rows[:, 1] % dist.local_world_size() == dist.local_rank()
        self.store(rows[mine, 0], embs[mine.to(embs.device)])

    def flush(self) -> None:
        self.emb.flush()
        self.checksums.flush()
        self.filled.flush()

    def close(self) -> None:
        """Flush and release the slot's lock (process exit releases it too)."""
        self.flush()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.lookups)


def encode_rows(rows: torch.Tensor, dtype: str) -> np.ndarray:
    """Rows [B, D] as the cache stores them: rounded to nearest in `dtype`; bf16 as its raw 16 bits."""
    _, storage, rounded = STORAGE[dtype]
    out = rows.detach().float().cpu().to(rounded)
    return out.view(torch.int16).numpy().view(storage) if dtype == "bf16" else out.numpy()


def row_checksums(stored: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes [B] (uint32), of rows as the cache stores them."""
    stored = np.ascontiguousarray(stored)
    return np.fromiter((zlib.crc32(row) for row in stored), dtype=np.uint32, count=len(stored))


def decode_rows(stored: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows [B, D] (a copy) from rows as the cache stores them."""
    if dtype == "bf16":
        return torch.from_numpy(np.array(stored).view(np.int16)).view(torch.bfloat16).float().numpy()
    return np.array(stored, dtype=np.float32)


def norm_tolerance(dtype: str) -> float:
    """How far from 1 the squared norm of a normalised row may be once stored in `dtype`. Rounding each element to
    `dtype` changes it by a factor within 1 +- u (u = eps / 2), so the squared norm by at most 2u + u^2: this allows
    twice that, 2 eps (float16 2.0e-3, bfloat16 1.6e-2; float32 keeps 1e-3, far above its rounding). Torn and zeroed
    rows are off by far more (half a row lost: ~0.5). Measured on the demo's teacher rows: BENCHMARKS.md."""
    return max(1e-3, 2 * torch.finfo(STORAGE[dtype][2]).eps)


def _read_meta(path: Path) -> dict | None:
    """meta.json's contents; None if there is none, or none whole (a rebuild cut short)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _allocate(path: Path, nbytes: int, *, fresh: bool) -> None:
    """Give `path` (created empty if `fresh`) its `nbytes` and every disk block of them now, so that a full disk
    fails here in one line rather than as SIGBUS at the memmap's first write into a hole. Allocation keeps what the
    file holds; a file already allocated is left alone (without fallocate support, glibc touches every block)."""
    with open(path, "wb" if fresh else "r+b") as f:
        if os.fstat(f.fileno()).st_blocks * 512 >= nbytes:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                raise
            if fresh:
                f.truncate(0)  # give back the blocks it did get: the next open rebuilds it anyway
            raise TeacherCacheError(f"{os.strerror(e.errno)}: {path} (needs {nbytes / 1e9:.3g} GB)") from e


def _from_node_leader(value: str | Exception | None) -> str:
    """Collective: every rank gets what its node's local rank 0 passed; if any leader failed, every rank raises its
    error (so no rank is left waiting in the next collective)."""
    values = [value]
    if dist.world_size() > 1:
        values = [None] * dist.world_size()
        torch.distributed.all_gather_object(values, value)
    failed = [v for v in values if isinstance(v, Exception)]
    if failed:
        raise failed[0]
    return values[dist.node_index() * dist.local_world_size()]


def open_cache(cfg, teacher, run_dir: str | Path) -> TeacherCache:
    """The cache of `cfg`'s teacher over its training set (collective): `teacher.cache_dir`, else `<run_dir>/teacher_cache`."""
    return TeacherCache(cfg.teacher.cache_dir or Path(run_dir) / "teacher_cache", teacher_fingerprint=teacher.fingerprint,
                        dataset_dir=cfg.data.train, num_samples=mds_num_samples(cfg.data.train), dim=teacher.hidden_size,
                        unit_norm=cfg.teacher.normalize, dtype=cfg.teacher.cache_dtype)


def embed_cached(teacher, cache: TeacherCache | None, batch: dict) -> torch.Tensor:
    """Teacher embeddings for a batch, from the cache where present. Collective when the teacher is sharded:
    `teacher.embed` runs on every rank even with zero misses, and equalises forward counts itself, so ranks may miss
    different numbers of rows (damaged ones included)."""
    ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    if cache is None:
        return teacher.embed(ids, mask)
    emb, hit = cache.lookup(batch["index"])
    miss = ~hit
    fresh = cache.rounded(teacher.embed(ids[miss], mask[miss]))
    cache.store_everywhere(batch["index"][miss], fresh)
    emb = emb.to(fresh.device)
    emb[miss.to(fresh.device)] = fresh
    return emb
