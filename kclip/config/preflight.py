"""The filesystem pre-flight: what the config names on disk exists and is what it claims to be, and /dev/shm can hold
DeepSpeed's CPU allreduce buffers. Run by kclip.validate and the CLI in the launching process, and by the constructors
that take a section directly (build_teacher), so a benchmark or a test that skips validate() gets the same one-line
errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from kclip.config.schema import ConfigError, TeacherConfig, check_section

# The errors of a write that found no room: a full disk, and a user or project quota (the usual limit on a cluster's
# shared file systems). Both are the user's to fix, so both are one line wherever kclip writes much.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The files a model folder keeps its weights in; a .gguf teacher is one file holding weights and tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# A folder holds a Hugging Face tokenizer when it has one of these (without, transformers fails with a TypeError).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Captions the pooling check tokenizes: a short one, and one that truncation must cut at student.text_max_len.
POOLING_PROBES = ("a dog on the grass", "apple pie " * 200)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes are a model's weights: the .gguf file itself, or the checkpoint files of a folder."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def mds_num_samples(folder: str | os.PathLike) -> int:
    """Samples in an MDS dataset, read from its index.json (no data is opened)."""
    shards = json.loads((Path(folder) / "index.json").read_text())["shards"]
    return sum(s["samples"] for s in shards)


def _read_json(key: str, path: Path, remedy: str = "rebuild the dataset with `kclip prepare`"):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: truncated or garbage JSON, bytes that are not UTF-8
        raise ConfigError(f"{key}: {path} is unreadable ({type(e).__name__}: {e}); {remedy}") from None


def model_config(key: str, folder: str, expected: str) -> dict:
    """The config.json of a Hugging Face model folder, read here so that a missing, truncated or foreign one is one
    line naming `key` rather than a traceback from deep inside transformers."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}: {folder} has no config.json (expected {expected})")
    config = _read_json(key, path, remedy=f"expected {expected}")
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} is not a model config (a JSON object; expected {expected})")
    return config


def _index_shards(key: str, folder: Path) -> list[tuple[str, str | None, int]]:
    """(basename, compressed basename or None, samples) per shard of the folder's index.json."""
    path = folder / "index.json"
    index = _read_json(key, path)
    try:
        return [(s["raw_data"]["basename"], (s.get("zip_data") or {}).get("basename"), int(s["samples"]))
                for s in index["shards"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON, but not a list of MDS shard entries
        raise ConfigError(f"{key}: {path} is not an MDS index (no valid shard list: {type(e).__name__}: {e}); "
                          "rebuild the dataset with `kclip prepare`") from None


def _written(key: str, folder: Path) -> int:
    """The sample count `kclip prepare` recorded in stats.json, which it writes only once every shard and the index
    are complete: an interrupted conversion leaves an index.json that lists only the shards it got to."""
    path = folder / "stats.json"
    if not path.is_file():
        raise ConfigError(f"{key}: {folder} is incomplete: no stats.json, which `kclip prepare` writes last (an "
                          "interrupted conversion?); re-run `kclip prepare` into an empty folder")
    stats = _read_json(key, path)
    written = stats.get("written") if isinstance(stats, dict) else None
    if type(written) is not int:
        raise ConfigError(f"{key}: {path} has no sample count (`written`); re-run `kclip prepare` into an empty folder")
    return written


def check_mds(key: str, folder: str | None, required: bool) -> int | None:
    """The sample count of the MDS dataset `folder`; ConfigError naming `key` when it is not one, is incomplete or
    holds no samples."""
    if folder is None:
        if required:
            raise ConfigError(f"{key}: required (an MDS folder written by `kclip prepare`)")
        return None
    root = Path(folder)
    if not (root / "index.json").is_file():
        raise ConfigError(f"{key}: {folder} is not an MDS dataset (no index.json); build it with `kclip prepare`")
    shards = _index_shards(key, root)
    samples = sum(n for *_, n in shards)
    written = _written(key, root)
    if samples != written:
        raise ConfigError(f"{key}: {folder} is incomplete: index.json lists {samples} samples, stats.json says "
                          f"`kclip prepare` wrote {written}; re-run `kclip prepare` into an empty folder")
    if not samples:
        raise ConfigError(f"{key}: {folder} holds no samples (`kclip prepare` skipped every record: see its "
                          "rejects.jsonl)")
    absent = [(raw, zipped) for raw, zipped, _ in shards if not (root / raw).exists()]
    missing = [raw for raw, zipped in absent if not (zipped and (root / zipped).exists())]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} shard(s) listed in index.json are missing, e.g. {missing[0]}")
    if absent:
        # streaming decompresses .zstd shards next to them on first read, mid-epoch, on every rank
        check_writable(key, root, why="holds compressed shards that streaming decompresses next to them")
    return samples


def check_writable(key: str, folder: Path, why: str = "") -> None:
    """ConfigError naming `key` unless a file can be created in `folder` (or, if it does not exist yet, in the nearest
    folder above it that does). A real write, not os.access: root passes os.access on any folder it cannot write."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        reason = f"{why}, but it is not writable" if why else "is not writable"
        raise ConfigError(f"{key}: {folder} {reason} ({e.strerror or e})") from e


def check_teacher_path(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"teacher.path: no such file or folder {path}")
    if os.path.isdir(path):
        model_config("teacher.path", path, expected="a Hugging Face model folder or a .gguf file")
        if not weight_files(path):
            raise ConfigError(f"teacher.path: {path} holds no weights (*.safetensors or *.bin)")
    elif not path.endswith(".gguf"):
        raise ConfigError(f"teacher.path: {path} is a file but not .gguf")
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":  # an HTML error page or an interrupted download, caught before any rank loads it
            what = "is empty" if not magic else "is not a GGUF file (no GGUF magic at its start)"
            raise ConfigError(f"teacher.path: {path} {what}; download it again (kclip fetch-teacher for the demo's)")
        try:
            import gguf  # noqa: F401 - transformers needs it to read GGUF files
        except ImportError:
            raise ConfigError(f"teacher.path: {path} is a GGUF file; reading it needs the `gguf` package "
                              "(pip install gguf)") from None


def check_teacher(cfg: TeacherConfig) -> None:
    """A teacher section that can be loaded: its own rules, exactly one source, and that source on disk."""
    check_section(cfg, "teacher.")
    cfg.check()
    if (cfg.path is None) == (cfg.random_config is None):
        raise ConfigError("teacher.path: set exactly one of teacher.path and teacher.random_config")
    if cfg.path:
        check_teacher_path(cfg.path)


def check_shard_within(teacher: TeacherConfig, world_size: int, local_world_size: int) -> None:
    """`teacher.shard_within: node` partitions the teacher over each node's ranks: the world must be whole nodes of
    `local_world_size` ranks. Called before any collective (creating the node groups is one)."""
    if teacher.shard_within == "node" and world_size % local_world_size:
        raise ConfigError(f"teacher.shard_within: node needs equal nodes, but the world size {world_size} is not a "
                          f"multiple of the {local_world_size} ranks per node (LOCAL_WORLD_SIZE); use world")


# DeepSpeed's CPU accelerator maps one allreduce workspace per rank into /dev/shm (69,206,024 bytes measured with
# DeepSpeed 0.19.8), named deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never removes it. A Docker
# container's default /dev/shm is 64 MiB: the first rank then dies of a Bus error before step 1, printing nothing.
SHM_BUFFER_BYTES = 69_206_024


def uses_cpu_accelerator() -> bool:
    import torch  # only here: the rest of the pre-flight runs without torch

    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def shm_buffer_glob(port: int | str | None = None) -> str:
    """The shared-memory files DeepSpeed's CPU allreduce creates: all of this user's, or those of the group on `port`."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*" + (f"_{port}_*" if port is not None else "")


def shm_shortfall(ranks_on_node: int) -> str | None:
    """One line when /dev/shm cannot hold the CPU allreduce buffers of this node's ranks; None when it can."""
    if not uses_cpu_accelerator() or not os.path.isdir("/dev/shm"):
        return None
    free, need = shutil.disk_usage("/dev/shm").free, ranks_on_node * SHM_BUFFER_BYTES
    if free >= need:
        return None
    return (f"/dev/shm has {free / 2**20:.0f} MiB free; DeepSpeed's CPU accelerator needs {need / 2**20:.0f} MiB "
            f"({ranks_on_node} rank(s) x {SHM_BUFFER_BYTES / 2**20:.0f} MiB): raise it (docker run --shm-size=1g) or "
            f"remove stale {shm_buffer_glob()} files of finished runs")
