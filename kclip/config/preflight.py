"""The filesystem pre-flight: what the config names on disk exists and is what it claims to be. Run by validate()
in the launching process, and by the constructors that take a section directly (build_teacher), so a benchmark or a
test that skips validate() gets the same one-line errors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kclip.config.schema import ConfigError, TeacherConfig, check_section

# The files a model folder keeps its weights in; a .gguf teacher is one file holding weights and tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def check_mds(key: str, folder: str | None, required: bool) -> int | None:
    """The sample count of the MDS dataset `folder`; ConfigError naming `key` when it is not one, or is incomplete."""
    if folder is None:
        if required:
            raise ConfigError(f"{key}: required (an MDS folder written by `kclip prepare`)")
        return None
    if not (Path(folder) / "index.json").is_file():
        raise ConfigError(f"{key}: {folder} is not an MDS dataset (no index.json); build it with `kclip prepare`")
    index = json.loads((Path(folder) / "index.json").read_text())
    missing = [s["raw_data"]["basename"] for s in index["shards"] if not (Path(folder) / s["raw_data"]["basename"]).exists()
               and not (s.get("zip_data") and (Path(folder) / s["zip_data"]["basename"]).exists())]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} shard(s) listed in index.json are missing, e.g. {missing[0]}")
    if any(not (Path(folder) / s["raw_data"]["basename"]).exists() for s in index["shards"]):
        # streaming decompresses .zstd shards next to them on first read, mid-epoch, on every rank
        check_writable(key, Path(folder), why="holds compressed shards that streaming decompresses next to them")
    return mds_num_samples(folder)


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
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"teacher.path: {path} has no config.json (expected a Hugging Face model folder or a .gguf file)")
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
