"""GGUF model files: where transformers reads one from (`split_gguf`), its config, and converted copies, so that only
the first load of a GGUF file pays for reading it. A leaf below the tokenizers and the teacher, which both read GGUF.

Loading a GGUF teacher makes transformers parse its metadata (the vocabulary included) for the config and again for
the tokenizer, and de-quantise every tensor into float32 on every start: 13 s of the demo's 20 s to its first step for
a 135M model. The first load saves what it built as a plain Hugging Face folder (config.json, model.safetensors in
float32, the tokenizer) and every later start reads that instead: the safetensors file is memory-mapped, and the
config and tokenizer are small JSON files.

Layout: `$KCLIP_CACHE/gguf/<file stem>-<key>/` (KCLIP_CACHE defaults to `$XDG_CACHE_HOME/kclip`, else
`~/.cache/kclip`, where scripts/*.sh keep DeepSpeed's built op: one place per user and machine, not per run, because a
converted teacher serves every run of that file). `key` hashes the GGUF's identity (size, mtime_ns, first and last MiB)
and the versions of transformers and gguf, which do the de-quantisation. The weights are saved exactly as
de-quantised (float32); a bf16 run casts them when loading, as it casts the GGUF's. The embeddings are therefore the
GGUF's, bit for bit, and the teacher fingerprint (hence the embedding cache) still hashes the GGUF file itself.

A folder is written as `<name>.partial` and renamed into place, so it appears whole or not at all; its `meta.json`,
written last, lists every file's size, and a folder whose files do not match (truncated by a disk fault) is rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from functools import lru_cache
from pathlib import Path

from kclip.config import ConfigError

log = logging.getLogger(__name__)

META = "meta.json"
POLL_S = 0.2  # how often a waiting process tries the lock again: flock itself takes no timeout
REPORT_S = 60.0  # how often it says what it is still waiting for


def split_gguf(path: str) -> tuple[str, str | None]:
    """A model path is a folder, or a `.gguf` file that transformers loads as (folder, gguf_file=name)."""
    if path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


@lru_cache(maxsize=8)
def gguf_config(path: str):
    """The model config a `.gguf` file holds, from its converted copy when there is one. Cached: reading a GGUF's
    metadata takes seconds (2.4 s for the demo's 135M teacher), and loading the teacher needs it for the model and
    again for the tokenizer's class."""
    from transformers import AutoConfig

    folder, gguf_file = split_gguf(resolve(path))
    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


def cache_root() -> Path:
    """kclip's cache folder of this user and machine: converted GGUF copies, and the caption autoencoders of
    kclip.eval.caption_autoencoder."""
    return Path(os.environ.get("KCLIP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "kclip")


def sample_digest(path: Path, span: int = 1 << 20) -> str:
    """Hash of a file's first and last `span` bytes: tells apart files with equal names and sizes (a base and a chat
    model) without reading gigabytes. Also what the teacher fingerprint hashes of each weight file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        f.seek(max(0, path.stat().st_size - span))
        h.update(f.read(span))
    return h.hexdigest()


def _place(path: str) -> tuple[Path, dict]:
    """(the folder of the GGUF `path`'s converted copy, its identity). One start looks it up for the config, the
    tokenizer and the weights: computed once per version of the file."""
    st = os.stat(path)
    return _place_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _place_of(path: str, size: int, mtime_ns: int) -> tuple[Path, dict]:
    """What the converted weights depend on: the file (mtime_ns catches a file rewritten in place, the sampled bytes
    another file of the same size and time) and the code that de-quantises it."""
    from importlib.metadata import version

    identity = {"size": size, "mtime_ns": mtime_ns, "sample_sha256": sample_digest(Path(path)),
                "transformers": version("transformers"), "gguf": version("gguf")}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(path).stem}-{key}", identity


def _complete(folder: Path, identity: dict) -> bool:
    """`folder` holds a finished conversion of this identity: checked by file sizes only, which costs a few stat calls
    (hashing would read the whole model on every start)."""
    try:
        meta = json.loads((folder / META).read_text())
        return meta["identity"] == identity and all((folder / name).stat().st_size == size
                                                    for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def resolve(path: str, convert: bool = False, timeout_s: float = math.inf) -> str:
    """Where to read the teacher `path` from: a `.gguf` file's converted folder when the cache holds a complete one;
    else, with `convert`, the folder converted now, or `path` itself (after one warning) if that fails; else `path`.

    Conversion failures never fail the run: the cache only saves time, and the GGUF itself still loads. Waiting longer
    than `timeout_s` (teacher.convert_timeout_s) for another process converting it does: ConfigError, one line.
    """
    if not path.endswith(".gguf"):
        return path
    folder, identity = _place(path)
    if _complete(folder, identity):
        return str(folder)
    if not convert:
        return path
    try:
        if _convert_once(path, folder, identity, timeout_s):
            return str(folder)
        log.warning("teacher: another process's conversion of %s into %s did not finish; loading the GGUF directly",
                    path, folder)
    except ConfigError:  # the run's bound, not a cache failure: falling back, every waiting rank would de-quantise
        # the whole GGUF at once, the cost the lock is there to avoid
        raise
    except Exception as e:  # noqa: BLE001 - whatever failed (a full or read-only cache, a corrupt GGUF), the GGUF
        # loader runs as before, and reports a bad file in its own words
        hint = (" (on every start until fixed: set KCLIP_CACHE to a writable folder with room, or "
                "teacher.convert_gguf=false)") if isinstance(e, OSError) else ""
        log.warning("teacher: cannot convert %s into %s (%s: %s); loading the GGUF directly%s", path, folder,
                    type(e).__name__, e, hint)
    return path


def _convert_once(path: str, folder: Path, identity: dict, timeout_s: float) -> bool:
    """Convert `path` into `folder` unless another process does; True once `folder` is complete.

    One process converts, holding a file lock next to the folder; the others (ranks of this node, of other nodes on a
    shared cache, other jobs) wait on the lock, then read its result. Not every rank for itself: each would hold the
    whole float32 model in memory at once (a 7B teacher: 28 GB per rank). Not local rank 0 before a barrier: a barrier
    is a collective bounded by dist.timeout_s, which a large teacher's conversion can outlast, the unsharded teacher
    has no process group, and it would not order nodes sharing the cache or two jobs. Waiting on the lock is no
    collective, so it cannot pair up with one; the heartbeat thread keeps beating meanwhile. The wait has its own bound,
    `timeout_s`: the converter writes its host:pid into the lock file, which the waiting lines and the error name.
    False when this process waited and the holder left no complete folder: its failure (a full disk) would fail again
    here, and every waiting rank retrying in turn would multiply the cost.
    Not covered: nodes with caches of their own, some holding the copy and some not (a job requeued onto other
    hosts). Those that have it go on to the first collective of the sharded load and wait there, within
    dist.timeout_s, for those converting.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a+") as lock:
        waited = not _try_lock(lock)
        if waited:
            _wait_for(lock, path, folder, timeout_s)
        done = _complete(folder, identity)  # also when a holder finished between the look-up and the lock
        if not (done or waited):
            _set_holder(lock, f"{socket.gethostname()}:{os.getpid()}")
            try:
                _convert(path, folder, identity)
            finally:
                _set_holder(lock, "")  # a later waiter must not name this process, long gone
            done = True
        return done


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _set_holder(lock, holder: str) -> None:
    os.ftruncate(lock.fileno(), 0)
    os.write(lock.fileno(), holder.encode())


def _holder(lock) -> str:
    """The converter named in the lock file; empty between its taking the lock and writing its name."""
    return os.pread(lock.fileno(), 256, 0).decode(errors="replace").strip() or "another process"


def _wait_for(lock, path: str, folder: Path, timeout_s: float) -> None:
    """Take `lock` once its holder, converting `path`, lets go; ConfigError after `timeout_s`."""
    began = time.monotonic()
    reported = -math.inf
    while not _try_lock(lock):
        waited = time.monotonic() - began
        if waited >= timeout_s:
            raise ConfigError(f"teacher.convert_timeout_s: waited {waited:.1f} s for {_holder(lock)} converting "
                              f"{path} into {folder} (lock {lock.name}); raise teacher.convert_timeout_s if it is "
                              "still converting, end it if it is stuck, or set teacher.convert_gguf=false to load the "
                              "GGUF without waiting")
        if waited - reported >= REPORT_S:
            log.info("teacher: waiting for %s converting %s into %s: %.0f s of at most %g s "
                     "(teacher.convert_timeout_s)", _holder(lock), path, folder, waited, timeout_s)
            reported = waited
        time.sleep(min(POLL_S, timeout_s - waited))


def _convert(path: str, folder: Path, identity: dict) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    began = time.monotonic()
    config = gguf_config(path)
    with torch.device("meta"):  # the size, before seconds of de-quantising
        size = 4 * sum(p.numel() for p in AutoModel.from_config(config).parameters())
    free = shutil.disk_usage(folder.parent).free
    if size > free / 2:  # an optimisation must not fill the disk the run's checkpoints and embedding cache need
        raise OSError(f"its float32 weights take {size / 1e9:.1f} GB, more than half of the {free / 1e9:.1f} GB free")
    log.info("teacher: converting %s into %s (once per file, %.2f GB)", path, folder, size / 1e9)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a converter killed mid-write (the lock is ours now)
    try:
        gguf_folder, gguf_file = split_gguf(path)
        model = AutoModel.from_pretrained(gguf_folder, gguf_file=gguf_file, config=config, dtype=torch.float32)
        model.save_pretrained(partial)
        # The tokenizer as the file defines it: kclip.tokenizers.load_tokenizer adds its pad token when reading it.
        AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file, config=config).save_pretrained(partial)
        files = {f.name: f.stat().st_size for f in partial.iterdir()}
        (partial / META).write_text(json.dumps({"gguf": os.path.abspath(path), "identity": identity, "files": files},
                                               indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # a damaged copy: the look-up found it incomplete
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("teacher: converted in %.1f s", time.monotonic() - began)
