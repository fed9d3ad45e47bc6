"""The MDS datasets kclip reads, on mosaicml-streaming's StreamingDataset: decoded image-caption records (undecodable
ones replaced and counted), and captions alone.

Sample order and resumption come from StreamingDataset:
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
"""
from __future__ import annotations

import logging
import os
import time

from streaming import StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.util import clean_stale_shared_memory

from kclip.data.transforms import crop_draws, decode_rgb, eval_pixels, train_pixels
from kclip.dist import map_launcher_env

log = logging.getLogger(__name__)

PREPARE_POLL_S = 0.007  # streaming's own TICK while it waits for a shard being prepared

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


def before_first_dataset(data_dir: str) -> None:
    """Checks and environment every StreamingDataset here needs: an MDS folder, the launcher's variables mapped to
    the ones streaming reads, and stale shared memory of crashed runs removed."""
    if not os.path.isfile(os.path.join(data_dir, "index.json")):
        raise FileNotFoundError(f"not an MDS folder (no index.json): {data_dir}")
    map_launcher_env()
    _clean_stale_shm_once()


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
        # Never streaming's own wait (blocking=True): it sleeps while another thread holds the shard as being
        # prepared, and a thread whose preparation failed (a damaged shard) leaves it so forever. This wait also
        # looks at whether streaming's read-ahead has failed.
        delta = super().prepare_shard(shard_id, False)
        while blocking and self._shard_states[shard_id] == _ShardState.PREPARING:
            if self._background_failed():
                raise self._failure(None, shard_id)
            time.sleep(PREPARE_POLL_S)
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

    def _background_failed(self) -> bool:
        return getattr(self, "_event", None) is not None and self._event.is_set()

    def _failure(self, missing: str | None, unreadable: int | None = None, reason: str = "") -> DataError:
        """The one-line error for a shard gone from disk (`missing`), or one that cannot be prepared (`unreadable`:
        its index, or else the one streaming's failed read-ahead left marked as being prepared), once streaming's
        background threads are stopped."""
        if hasattr(self, "_event"):
            # Stop streaming's background threads, as streaming does when a read fails, and wait for them: a
            # prefetch still retrying the shard would otherwise raise in the middle of whatever runs next.
            self._event.set()
            self._executor.shutdown(wait=True)
        folder = self.streams[0].local
        if missing is not None:
            return DataError(f"data: shard {missing} of {folder} is gone (deleted during the run?): restore it, then "
                             "continue with --resume latest")
        if unreadable is None:
            unreadable = next((s for s, state in enumerate(self._shard_states)
                               if state == _ShardState.PREPARING), None)
        shard = None if unreadable is None else self.shards[unreadable]
        name = "a shard" if shard is None else f"shard {(shard.zip_data or shard.raw_data).basename}"
        reason = reason or " (the log holds streaming's error)"
        return DataError(f"data: {name} of {folder} cannot be read{reason}: "
                         "restore it or rebuild the dataset with `kclip prepare`, then continue with --resume latest")

    def _first_missing_shard(self) -> str | None:
        return next(filter(None, (self._missing_shard(s) for s in range(len(self.shards)))), None)

    def read_record(self, index: int, retry: int) -> dict:
        """Record `index`, after checking that its shard is still on disk (one stat when it is: streaming stats the
        same file itself) and that streaming's read-ahead has not failed. Either is then one line. Unchecked, the read
        ends in streaming's "In the absence of local dataset, path to remote dataset must be provided", or waits
        forever for a shard its failed prefetch thread left marked as being prepared."""
        missing = self._missing_shard(self.spanner[index][0])
        if missing is None and self._background_failed():
            raise self._failure(self._first_missing_shard())
        if missing is not None:
            raise self._failure(missing)
        try:
            return StreamingDataset.get_item(self, index, retry)
        except Exception as e:  # noqa: BLE001 - what a damaged shard raises depends on its compression
            shard = self.spanner[index][0]
            if shard in self._prepared:  # on disk and read before: not a preparation failure
                raise
            raise self._failure(None, shard, f" ({type(e).__name__}: {' '.join(str(e).split())})") from e

    def __iter__(self):
        yield from super().__iter__()
        # When streaming's prefetch thread fails (it met a deleted or damaged shard first), streaming ends the epoch
        # early and silently, and raises "Background thread failed. Check other traceback." only at the next epoch's
        # start: a short epoch would pass for a whole one.
        if self._background_failed():
            raise self._failure(self._first_missing_shard())


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
