"""Streaming loader over MDS folders written by `kclip prepare`: decoded, transformed, tokenised batches.

Sample order and resumption come from mosaicml-streaming's StreamingDataset:
- Each rank gets a disjoint share of the epoch; streaming pads the epoch (repeating a few samples) so every rank has
  the same number of samples, and `drop_last` then gives every rank the same number of equal-sized batches, which
  the all-gathered contrastive loss and the ZeRO-3 teacher (one forward per rank per step) require.
- The global order depends on (seed, epoch, num_canonical_nodes, shuffle algorithm) only, not on the world size, so
  `StreamingDataLoader.state_dict()` taken on N ranks resumes on M ranks with the same global batch.
- Epochs: every `iter(loader)` starts the next epoch (streaming pre-increments a shared epoch counter), reshuffled
  with seed + epoch. After `load_state_dict(state)`, the next `iter` continues the saved epoch mid-way; the
  following `iter` starts the epoch after it. Abandoning an iteration mid-epoch and iterating again also moves on
  to the next epoch.

Augmentation is seeded per (seed, epoch, sample index), so a resumed run also reproduces the pixels.

Per-sample work is kept to what each sample needs (a loader core per GPU is the budget at scale): the crop's random
numbers come from a counter-based generator at (seed, epoch, index) rather than a reseeded torch RNG, samples stay
uint8 until the collate normalises the whole batch in one vectorised pass.
"""
from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.util import clean_stale_shared_memory

from kclip.data.transforms import (
    crop_draws,
    decode_rgb,
    eval_pixels,
    normalize,
    train_pixels,
)
from kclip.dist import map_launcher_env
from kclip.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

# Consecutive undecodable records tolerated before giving up: more means the data, not a record, is broken.
MAX_REPLACEMENTS = 64
# The one shuffle algorithm kclip uses; resumption on another world size needs it fixed.
SHUFFLE_ALGO = "py1e"

_cleaned_shm = False


def _clean_stale_shm_once() -> None:
    """Remove shared memory that crashed runs left behind, once per process and before our first StreamingDataset.

    streaming's cleaner unlinks every streaming segment on the node, live or not, so calling it again once a dataset
    exists would pull shared state from under it. This assumes one kclip job per node (the usual allocation).
    All local ranks must take part: local rank 0 cleans while the others wait at a barrier.
    """
    global _cleaned_shm
    if not _cleaned_shm:
        clean_stale_shared_memory()
        _cleaned_shm = True


def _before_first_dataset(data_dir: str) -> None:
    """Checks and environment every StreamingDataset here needs: an MDS folder, the launcher's variables mapped to
    the ones streaming reads, and stale shared memory of crashed runs removed."""
    if not os.path.isfile(os.path.join(data_dir, "index.json")):
        raise FileNotFoundError(f"not an MDS folder (no index.json): {data_dir}")
    map_launcher_env()
    _clean_stale_shm_once()


def _worker_start_method(num_workers: int) -> str | None:
    """Fork workers where the OS can: they only decode and tokenise on the CPU, and a forked worker starts in
    milliseconds, while a spawned one (the default inside spawned processes, and forkserver on Python 3.14+)
    re-imports torch and transformers at every epoch, which takes seconds to a minute."""
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


class DataError(RuntimeError):
    """The dataset changed under a running job: a shard it listed at the start is gone."""


class LocalDataset(StreamingDataset):
    """A StreamingDataset over a local folder whose shard preparation costs nothing once a shard is on disk.

    streaming's background thread calls `prepare_shard` for every sample, and each call takes a file lock (an open, an
    flock and a close), contending for the GIL with the decoding: ~20 ms per batch of 64 on the demo data, a third of
    the loader's CPU (BENCHMARKS.md, Loader). kclip's data is local and never evicted (no remote, no cache_limit), so a
    shard found prepared (uncompressed on disk) stays so: the lock is taken until then, and skipped after. A shard
    deleted during the run is `read_record`'s to report.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prepared: set[int] = set()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> int:
        if shard_id in self._prepared:
            return 0
        delta = super().prepare_shard(shard_id, blocking)
        # LOCAL is also the state of a shard present only compressed; the raw file is what reads need.
        raw = self.shards[shard_id].raw_data.basename
        if (self._shard_states[shard_id] == _ShardState.LOCAL
                and os.path.isfile(os.path.join(self.streams[0].local, raw))):
            self._prepared.add(shard_id)
        return delta

    def _missing_shard(self, shard_id: int) -> str | None:
        """The name of shard `shard_id` when neither its .mds nor its .mds.zstd is on disk any more."""
        shard = self.shards[shard_id]
        names = [part.basename for part in (shard.raw_data, shard.zip_data) if part is not None]
        folder = self.streams[0].local
        return None if any(os.path.exists(os.path.join(folder, name)) for name in names) else names[-1]

    def read_record(self, index: int, retry: int) -> dict:
        """Record `index`, after checking that its shard is still on disk (one stat when it is: streaming stats the
        same file itself). A shard deleted mid-run is then one line naming it. Unchecked, the read ends in
        streaming's "In the absence of local dataset, path to remote dataset must be provided", or "Background thread
        failed" when its prefetch thread met the shard first, or waits forever for the shard that thread left marked
        as being prepared."""
        missing = self._missing_shard(self.spanner[index][0])
        background_failed = getattr(self, "_event", None) is not None and self._event.is_set()
        if missing is None and background_failed:
            missing = next(filter(None, (self._missing_shard(s) for s in range(len(self.shards)))), None)
        if missing is not None:
            if hasattr(self, "_event"):
                # Stop streaming's background threads, as streaming does when a read fails, and wait for them: a
                # prefetch still retrying the shard would otherwise raise in the middle of whatever runs next.
                self._event.set()
                self._executor.shutdown(wait=True)
            raise DataError(f"data: shard {missing} of {self.streams[0].local} is gone (deleted during the run?): "
                            "restore it, then continue with --resume latest")
        return StreamingDataset.get_item(self, index, retry)


class CaptionImageDataset(LocalDataset):
    """MDS records -> {pixels (uint8 HWC), caption, sample_id, index, labels, replaced}; undecodable records are
    replaced."""

    def __init__(
        self,
        data_dir: str,
        *,
        batch_size: int,
        image_size: int,
        train: bool,
        seed: int,
        shuffle: bool,
        num_canonical_nodes: int,
        label_columns: tuple[str, ...],
    ):
        super().__init__(
            local=data_dir,
            remote=None,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=seed,
            shuffle_algo=SHUFFLE_ALGO,
            num_canonical_nodes=num_canonical_nodes,
        )
        absent = [c for c in label_columns if c not in self.shards[0].column_names]
        if absent:
            raise ValueError(f"{data_dir}: no label column(s) {absent}; columns are {self.shards[0].column_names}")
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.label_columns = label_columns
        self.epoch = 0

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # The epoch streaming is about to iterate, recorded in this (worker's) copy for augmentation seeds.
        self.epoch, sample_in_epoch = super()._resume_incr_epoch()
        return self.epoch, sample_in_epoch

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        """Sample `sample_id`, or if its image does not decode, the next index (cyclically) that does.

        `index`/`sample_id`/caption/pixels always describe the record actually delivered; `replaced` = 1 marks it.
        """
        for offset in range(MAX_REPLACEMENTS):
            index = int(sample_id + offset) % self.num_samples
            record = self.read_record(index, retry)
            try:
                image = decode_rgb(record["image"])
            except Exception as e:  # noqa: BLE001 - PIL signals bad bytes with many exception types
                log.warning("record %d (%s) does not decode (%s: %s); using the next one",
                            index, record["id"], type(e).__name__, e)
                continue
            if self.train:
                pixels = train_pixels(image, self.image_size, crop_draws(self.seed, self.epoch, index))
            else:
                pixels = eval_pixels(image, self.image_size)
            return {
                "pixels": pixels,  # uint8 HWC; Collate normalises the batch
                "caption": record["caption"],
                "sample_id": record["id"],
                "index": index,
                "labels": {c: record[c] for c in self.label_columns},
                "replaced": int(offset > 0),
            }
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive records from index {sample_id} do not decode")


class CaptionDataset(LocalDataset):
    """MDS records -> {caption, index} only: for passes that need the text alone (no image is decoded)."""

    def __init__(self, data_dir: str, *, batch_size: int):
        super().__init__(local=data_dir, remote=None, batch_size=batch_size, shuffle=False, shuffle_algo=SHUFFLE_ALGO)

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        return {"caption": self.read_record(sample_id, retry)["caption"], "index": int(sample_id)}


def _resolve(tokenizer):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def tokenize(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, truncated): right-padded to the longest caption after truncation to `max_len`.

    Only a caption that comes out exactly `max_len` long can have been truncated; those few are tokenised again in
    full to tell (tokenizers differ in where they put special tokens, so only the tokenizer itself can say).
    """
    enc = tokenizer(
        captions, truncation=True, max_length=max_len, padding="longest", padding_side="right", return_tensors="pt"
    )
    mask = enc["attention_mask"].long()
    truncated = torch.zeros(len(captions), dtype=torch.long)
    at_limit = (mask.sum(1) == max_len).nonzero().flatten().tolist()
    if at_limit:
        full = tokenizer([captions[i] for i in at_limit], add_special_tokens=True)["input_ids"]
        truncated[at_limit] = torch.tensor([len(ids) > max_len for ids in full], dtype=torch.long)
    return enc["input_ids"].long(), mask, truncated


class Collate:
    """Picklable collate: stacks pixels and tokenises captions for the student (and the teacher, if any).

    Tokenizers are objects or `load_tokenizer` specs. Specs are loaded here, in the training process, so a bad spec
    fails at build time and forked workers inherit the loaded tokenizer instead of re-reading it every epoch.
    """

    def __init__(self, student_tokenizer, student_max_len: int, teacher_tokenizer=None, teacher_max_len: int = 77,
                 label_columns: tuple[str, ...] = ()):
        self.student_tokenizer = _resolve(student_tokenizer)
        self.student_max_len = student_max_len
        self.teacher_tokenizer = None if teacher_tokenizer is None else _resolve(teacher_tokenizer)
        self.teacher_max_len = teacher_max_len
        self.label_columns = label_columns

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        ids, mask, truncated = tokenize(self.student_tokenizer, captions, self.student_max_len)
        batch = {
            "pixels": normalize(torch.from_numpy(np.stack([s["pixels"] for s in samples]))),
            "input_ids": ids,
            "attention_mask": mask,
        }
        if self.teacher_tokenizer is not None:
            t_ids, t_mask, t_truncated = tokenize(self.teacher_tokenizer, captions, self.teacher_max_len)
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = t_ids, t_mask
            truncated = truncated | t_truncated
        batch["sample_id"] = [s["sample_id"] for s in samples]
        # The raw text, not only its truncated token ids: evaluation tells captions apart by it.
        batch["caption"] = captions
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        if self.label_columns:
            batch["labels"] = {c: [s["labels"][c] for s in samples] for c in self.label_columns}
        batch["replaced"] = torch.tensor([s["replaced"] for s in samples], dtype=torch.long)
        batch["truncated"] = truncated
        return batch


class CaptionCollate:
    """Picklable collate for `CaptionDataset`: teacher token ids of the captions, their indices and truncation flags."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = _resolve(tokenizer)
        self.max_len = max_len

    def __call__(self, samples: list[dict]) -> dict:
        ids, mask, truncated = tokenize(self.tokenizer, [s["caption"] for s in samples], self.max_len)
        return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "truncated": truncated,
                "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


def build_caption_loader(data_dir: str, *, batch_size: int, tokenizer, max_len: int,
                         num_workers: int = 2) -> StreamingDataLoader:
    """Every caption of `data_dir` once, in index order, split across ranks (streaming repeats a few samples so that
    ranks get equal counts; the last batch may be partial)."""
    _before_first_dataset(data_dir)
    return StreamingDataLoader(
        CaptionDataset(data_dir, batch_size=batch_size), batch_size=batch_size,
        collate_fn=CaptionCollate(tokenizer, max_len), num_workers=num_workers,
        multiprocessing_context=_worker_start_method(num_workers),
    )


def build_loader(
    data_dir: str,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    student_tokenizer,
    student_max_len: int,
    teacher_tokenizer=None,
    teacher_max_len: int = 77,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 2,
    num_canonical_nodes: int = 1,
    label_columns: list[str] | tuple[str, ...] | None = None,
) -> StreamingDataLoader:
    """A loader over the local MDS folder `data_dir`; `batch_size` is per rank.

    Training batches are all full (drop_last). Evaluation (`train=False`) keeps the last partial batch so every
    sample is scored: streaming gives each rank the same sample count, so the partial batch has the same size on every
    rank and the gathered embeddings still line up.

    Keep `seed`, `shuffle` and `num_canonical_nodes` fixed across a run and its resumptions: they define the order.
    """
    _before_first_dataset(data_dir)
    label_columns = tuple(label_columns or ())
    dataset = CaptionImageDataset(
        data_dir,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        seed=seed,
        shuffle=shuffle,
        num_canonical_nodes=num_canonical_nodes,
        label_columns=label_columns,
    )
    collate = Collate(student_tokenizer, student_max_len, teacher_tokenizer, teacher_max_len, label_columns)
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context=_worker_start_method(num_workers),
        # Worker base seeds come from this generator instead of torch's global RNG, so iterating the loader never
        # shifts the training process's random stream (dropout, init) and a resumed run draws the same numbers.
        generator=torch.Generator().manual_seed(seed),
    )
