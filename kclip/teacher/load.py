"""Loading the frozen teacher (`build_teacher`): its model config and weights from a Hugging Face folder or a GGUF file
(through its converted copy), the ZeRO-3 inference engine that shards it (over all ranks, or within each node), the
layers past the pooled one dropped, and the fingerprint of everything that determines its embeddings."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct

import torch

from kclip import dist, gguf_files
from kclip.config import ConfigError, TeacherConfig
from kclip.config.preflight import check_shard_within, check_teacher, weight_files
from kclip.ds_config import load_template
from kclip.gguf_files import gguf_config, split_gguf
from kclip.teacher.model import Teacher
from kclip.tokenizers import RANDOM_TEACHER_TOKENIZER, load_tokenizer

log = logging.getLogger(__name__)


DS_TEMPLATES = {"none": "teacher_zero3", "cpu": "teacher_zero3_offload_cpu", "nvme": "teacher_zero3_offload_nvme"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Keys of a model config that name where or with what it was saved, not what it computes.
CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` = bf16 on GPU (halves memory and all-gather traffic), fp32 on CPU (CPU bf16 matmuls are slow and
    DeepSpeed's CPU path is only verified in fp32)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def teacher_ds_config(cfg: TeacherConfig, model_config, dtype: torch.dtype) -> dict:
    """The ZeRO-3 inference config: the template for `cfg.offload`, plus what the model and run determine.

    With h = hidden size: stage3_prefetch_bucket_size = int(0.9 h^2), stage3_param_persistence_threshold = 10 h,
    reduce_bucket_size = h^2 (the values Hugging Face derives for ZeRO-3), all integers because DeepSpeed rejects
    fractions. For NVMe offload, every swap buffer must hold the largest parameter (the embedding or an MLP matrix).
    """
    ds = load_template(DS_TEMPLATES[cfg.offload])
    h = model_config.hidden_size
    zero = ds.setdefault("zero_optimization", {})
    zero.update(
        stage3_prefetch_bucket_size=int(0.9 * h * h),
        stage3_param_persistence_threshold=10 * h,
        reduce_bucket_size=h * h,
    )
    if cfg.offload == "nvme":
        largest = max(model_config.vocab_size, model_config.intermediate_size) * h
        offload = zero.setdefault("offload_param", {})
        offload.update(nvme_path=str(cfg.nvme_path), buffer_size=max(int(offload.get("buffer_size", 0)), largest))
    # DeepSpeed requires a batch size even without an optimizer; one micro-batch is one chunk of captions.
    ds["train_micro_batch_size_per_gpu"] = cfg.chunk_size
    ds["gradient_accumulation_steps"] = 1
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds["fp16"] = {"enabled": dtype == torch.float16}
    return ds


@contextlib.contextmanager
def _reading(path: str):
    """A teacher file that passed the pre-flight but cannot be parsed (a truncated GGUF or safetensors file) becomes
    one ConfigError line naming it, instead of a reshape or header traceback from deep inside the reader."""
    from safetensors import SafetensorError

    try:
        yield
    except (ValueError, OSError, EOFError, KeyError, struct.error, SafetensorError) as e:
        if isinstance(e, ConfigError):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"teacher.path: {path} cannot be read, truncated or corrupt? ({type(e).__name__}: "
                          f"{first_line})") from e


def _model_config(cfg: TeacherConfig):
    from transformers import AutoConfig, LlamaConfig

    if cfg.random_config is not None:
        return LlamaConfig(**cfg.random_config)
    folder, gguf_file = split_gguf(cfg.path)
    with _reading(cfg.path):
        return gguf_config(cfg.path) if gguf_file else AutoConfig.from_pretrained(folder)


def _load_module(cfg: TeacherConfig, model_config, dtype: torch.dtype, ds_config: dict | None) -> torch.nn.Module:
    """The base decoder (no LM head). With `ds_config`, pretrained weights are loaded straight into ZeRO-3 partitions.

    A random teacher is small by definition: it is built whole from `cfg.seed` (identically on every rank) and
    partitioned later by `deepspeed.initialize`.
    """
    from transformers import AutoModel

    if cfg.random_config is not None:
        torch.manual_seed(cfg.seed)
        return AutoModel.from_config(model_config).to(dtype)
    folder, gguf_file = split_gguf(gguf_files.resolve(cfg.path, convert=cfg.convert_gguf,
                                                          timeout_s=cfg.convert_timeout_s))
    # Passing the config already read saves re-parsing it (reading a GGUF's metadata takes seconds).
    kwargs = {"config": model_config, "dtype": dtype} | ({"gguf_file": gguf_file} if gguf_file else {})
    if ds_config is None:
        with _reading(cfg.path):
            return AutoModel.from_pretrained(folder, **kwargs)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Process-global switch: while this object lives, every HF model built is partitioned. It must not outlive the
    # teacher's own loading, or the student created afterwards would be partitioned too.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    try:
        with _reading(cfg.path):
            return AutoModel.from_pretrained(folder, **kwargs)
    finally:
        unset_hf_deepspeed_config()
        del hf_ds_config


def shard_ranks(cfg: TeacherConfig, world_size: int, local_world_size: int) -> int:
    """How many ranks one copy of the sharded teacher is partitioned over (`teacher.shard_within`)."""
    return local_world_size if cfg.shard_within == "node" else world_size


def _partition_within(module: torch.nn.Module, group, ds_config: dict, layer: int) -> torch.nn.Module:
    """A copy of `module` (whole, or ZeRO-3-partitioned over the world as `_load_module` gives it) ZeRO-3-partitioned
    over `group` alone: every group then holds the whole teacher, and its forwards all-gather only inside it.

    Why a copy instead of loading straight into the group: transformers' ZeRO-3 loading assumes the group holds global
    rank 0. It reads the checkpoint on global rank 0 only, and the `module.apply` it calls while loading is wrapped by
    zero.Init to broadcast from global rank 0 within each parameter's group, which fails on every other node
    ("Global rank 0 is not part of group", DeepSpeed 0.19.8, transformers 4.57). The copy costs one world all-gather
    of the teacher, once (what one cold forward costs under `shard_within: world`), and at most both partitions plus
    two gathered copies of one parameter in memory.

    Why not DeepSpeed's hpZ (`zero_hpz_partition_size`): its secondary, node-wide partition does serve a forward-only
    engine (it is rebuilt only after optimizer steps, so every forward all-gathers inside the node), but it comes on
    top of the primary partition over the world (1/world + 1/node of the teacher per GPU), which GatheredParameters
    (`input_embeddings`) still gathers across nodes; and its node group is a process-wide singleton that zero.Init
    creates from the config and asserts it never creates twice, so one process could load only one teacher."""
    import deepspeed
    from transformers import AutoModel
    from transformers.modeling_utils import no_init_weights

    # no_init_weights: the copy's values come from `module`; initialising them would be wasted work.
    with no_init_weights(), deepspeed.zero.Init(data_parallel_group=group, config_dict_or_path=ds_config):
        copy = AutoModel.from_config(module.config)
    drop_layers_after(copy, layer)
    for src, dst in zip(module.parameters(), copy.parameters(), strict=True):
        # modifier_rank: re-partition `dst` from its written, gathered values (equal on every rank: all wrote them).
        with deepspeed.zero.GatheredParameters([src]), deepspeed.zero.GatheredParameters([dst], modifier_rank=0):
            dst.data.copy_(src.data)
    return copy


def drop_layers_after(module: torch.nn.Module, layer: int) -> None:
    """Make `module`'s last hidden state equal the full model's hidden_states[layer].

    hidden_states[0] is the embedding output, hidden_states[i] the output of decoder layer i, and only the last entry
    passes through the final norm. Layers after the pooled one never influence the embedding, so they are removed
    before any forward runs them: pooling from layer 16 of Llama-2-7B's 32 halves the teacher's cost. Removed
    ZeRO-3 partitions are freed before `deepspeed.initialize` ever registers them.
    """
    if layer < len(module.layers):
        module.layers = module.layers[:layer]
        module.norm = torch.nn.Identity()


def _fingerprint(cfg: TeacherConfig, model_config, tokenizer, dtype: torch.dtype) -> str:
    """16 hex digits of a hash over everything that determines the embeddings; equal fingerprints, equal embeddings."""
    arch = {k: v for k, v in model_config.to_dict().items() if k not in CONFIG_KEYS_IGNORED}
    if cfg.random_config is not None:
        weights = {"random_seed": cfg.seed}
    else:
        weights = {"files": [(f.name, f.stat().st_size, gguf_files.sample_digest(f)) for f in weight_files(cfg.path)]}
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    identity = {
        "config": arch, "weights": weights, "layer": cfg.layer, "normalize": cfg.normalize,
        "pooling": cfg.pooling + ("_skip_bos" if cfg.pooling == "mean" and tokenizer.bos_token_id is not None else ""),
        "max_len": cfg.max_len, "dtype": str(dtype), "tokenizer": [type(tokenizer).__name__, vocab],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_tokenizer(cfg: TeacherConfig):
    return load_tokenizer(cfg.path if cfg.path is not None else RANDOM_TEACHER_TOKENIZER)


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    """The fingerprint `build_teacher(cfg)` gives its teacher, without loading its weights (their files are hashed
    by size and sampled bytes): what caches of its embeddings are keyed by."""
    check_teacher(cfg)
    return _fingerprint(cfg, _model_config(cfg), teacher_tokenizer(cfg), resolve_dtype(cfg.dtype))


def build_teacher(cfg: TeacherConfig, *, shard: bool | None = None) -> Teacher:
    """Load the frozen teacher. `shard=None`: ZeRO-3 when world_size > 1 or parameters are offloaded, else a plain
    module. Sharded, every rank must call this (it is collective) and the process group is started if needed."""
    check_teacher(cfg)
    if shard is None:
        shard = dist.world_size() > 1 or cfg.offload != "none"
    if cfg.offload != "none" and not shard:
        raise ValueError(f"teacher.offload={cfg.offload} needs the ZeRO-3 teacher (shard=True)")
    dtype = resolve_dtype(cfg.dtype)
    model_config = _model_config(cfg)
    tokenizer = teacher_tokenizer(cfg)
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"teacher: tokenizer has {len(tokenizer)} tokens but the model only {model_config.vocab_size}")
    num_layers = model_config.num_hidden_layers
    if not -(num_layers + 1) <= cfg.layer <= num_layers:
        raise ValueError(f"teacher.layer must be in [{-(num_layers + 1)}, {num_layers}], got {cfg.layer}")
    ds_config = None
    if shard:
        dist.init()
        check_shard_within(cfg, dist.world_size(), dist.local_world_size())
        ds_config = teacher_ds_config(cfg, model_config, dtype)
    module = _load_module(cfg, model_config, dtype, ds_config)
    layer = cfg.layer % (num_layers + 1)
    drop_layers_after(module, layer)
    if shard and shard_ranks(cfg, dist.world_size(), dist.local_world_size()) < dist.world_size():
        module = _partition_within(module, dist.node_group(), ds_config, layer)
    module.requires_grad_(False)
    if shard:
        import deepspeed

        module, *_ = deepspeed.initialize(model=module, config=ds_config)
    else:
        module.to(dist.device())
    module.eval()
    teacher = Teacher(module, tokenizer, cfg, hidden_size=model_config.hidden_size,
                      fingerprint=_fingerprint(cfg, model_config, tokenizer, dtype), sharded=shard)
    teacher.check_packing()
    return teacher
