"""The frozen Llama teacher: caption token ids -> one pooled embedding per caption.

Sharded (ZeRO-3 inference), every rank keeps 1/world of each weight (with `teacher.shard_within: node`, 1/ranks per
node: a copy per node) and all-gathers one layer at a time during the forward pass, so a 7B-70B decoder fits next to
the student. The weights are loaded already partitioned (a `HfDeepSpeedConfig` kept alive only while `from_pretrained`
runs makes it build the model under `deepspeed.zero.Init`), so no rank ever materialises the whole model. Because
every submodule all-gathers, a sharded `Teacher.embed` is a collective: every rank must run the same number of forward
passes, which `embed` guarantees by itself.

Unsharded (one process, no offload), it is a plain frozen module on the local device.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct

import torch

from kclip import dist
from kclip.config import ConfigError, TeacherConfig
from kclip.config.preflight import check_teacher, weight_files
from kclip.config.validate import check_shard_within
from kclip.ds_config import load_template
from kclip.teacher import gguf_cache
from kclip.tokenizers import (
    RANDOM_TEACHER_TOKENIZER,
    gguf_config,
    load_tokenizer,
    split_gguf,
)

log = logging.getLogger(__name__)

DS_TEMPLATES = {"none": "teacher_zero3", "cpu": "teacher_zero3_offload_cpu", "nvme": "teacher_zero3_offload_nvme"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Captions of different lengths whose packed and single embeddings `Teacher.check_packing` compares.
PACKING_PROBE = ["a photo of a dog running on the grass", "two cats", "a red car parked by an old stone wall", "snow",
                 "people"]
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
    folder, gguf_file = split_gguf(gguf_cache.resolve(cfg.path, convert=cfg.convert_gguf,
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
        weights = {"files": [(f.name, f.stat().st_size, gguf_cache.sample_digest(f)) for f in weight_files(cfg.path)]}
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    identity = {
        "config": arch, "weights": weights, "layer": cfg.layer, "normalize": cfg.normalize,
        "pooling": cfg.pooling + ("_skip_bos" if cfg.pooling == "mean" and tokenizer.bos_token_id is not None else ""),
        "max_len": cfg.max_len, "dtype": str(dtype), "tokenizer": [type(tokenizer).__name__, vocab],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pack_right(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's tokens (mask 1) to the front, keeping their order: left- or right-padded input becomes
    right-padded, which the chunk trimming and last-token pooling rely on."""
    order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def pack_rows(lengths: torch.Tensor, capacity: int) -> list[list[int]]:
    """Caption indices grouped into rows of at most `capacity` tokens, longest captions first, each into the first
    row with room (first-fit decreasing: rows end up nearly full, so little padding is computed)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in torch.argsort(lengths, descending=True, stable=True).tolist():
        n = int(lengths[i])
        r = next((r for r, free in enumerate(room) if free >= n), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= n
    return rows


def _row_layout(rows: list[list[int]], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(captions, row, offset): the captions of `rows` in row order, each caption's row and its first token's column
    (the lengths of the captions before it in its row)."""
    sizes = torch.tensor([len(row) for row in rows])
    captions = torch.tensor([c for row in rows for c in row], dtype=torch.long)
    row_of = torch.repeat_interleave(torch.arange(len(rows)), sizes)
    before = torch.cumsum(lengths[captions], 0) - lengths[captions]  # tokens before each caption, all rows
    return captions, row_of, before - before[torch.cumsum(sizes, 0) - sizes][row_of]


class Teacher:
    """A frozen decoder that turns token ids into pooled caption embeddings.

    Counters (per process, real captions only): `tokens_processed` = tokens the forward passes ran on,
    `tokens_padded` = what padding every chunk to its batch's longest caption would have cost; `forwards` counts every
    forward pass, including the 1-token dummies that keep ranks in step.
    """

    def __init__(self, module, tokenizer, cfg: TeacherConfig, *, hidden_size: int, fingerprint: str, sharded: bool):
        self.module = module
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.fingerprint = fingerprint
        self.sharded = sharded
        self.device = dist.device()
        self.pad_id = tokenizer.pad_token_id
        self.packing = cfg.packing
        self.tokens_processed = 0
        self.tokens_padded = 0
        self.forwards = 0

    def check_packing(self) -> bool:
        """Turn packing off (with a warning) unless this model honours packed sequences; returns the final setting.

        Packing relies on the model deriving a block-diagonal mask from position ids (transformers' Llama family
        does). A model that ignored them would let captions attend to each other and silently change every
        embedding, so a few probe captions are embedded packed and alone, and must agree: their difference must be
        small next to the distance between different captions (bf16 rounding passes, cross-caption attention not).
        Collective when sharded (every rank probes, so all reach the same answer).
        """
        if not self.packing:
            return False
        ids, mask = self.tokenize(PACKING_PROBE)
        counters = self.tokens_processed, self.tokens_padded, self.forwards
        packed = self.embed(ids, mask)
        self.packing = False
        alone = self.embed(ids, mask)
        self.tokens_processed, self.tokens_padded, self.forwards = counters
        error = float((packed - alone).norm(dim=1).max())
        separation = float(torch.pdist(alone).min())
        self.packing = error < 0.05 * separation
        if not self.packing:
            log.warning("teacher: packed captions embed differently from single ones (difference %.3g vs %.3g between "
                        "captions): this model ignores packed position ids; using length-bucketed chunks instead",
                        error, separation)
        return self.packing

    def input_embeddings(self) -> torch.Tensor:
        """The whole input embedding matrix [model vocab, hidden] (rows past len(tokenizer) included) as a float32 CPU
        copy, on every rank.

        Sharded (also a 1-process teacher with offload), each rank holds only its slice, so the matrix is all-gathered:
        a collective every rank must call. A plain module's weight is just copied.
        """
        import deepspeed

        model = self.module.module if self.sharded else self.module  # a sharded teacher is a DeepSpeed engine
        weight = model.get_input_embeddings().weight
        with deepspeed.zero.GatheredParameters([weight], enabled=self.sharded):
            # A copy: on leaving the context the gathered storage is released.
            return weight.detach().to("cpu", torch.float32, copy=True)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask) [B, <= max_len], as `embed` takes them."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_len,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
                 ) -> torch.Tensor:
        self.forwards += 1
        # The module ends at the pooled layer (see `drop_layers_after`), so its last hidden state is that layer's.
        out = self.module(input_ids=ids.to(self.device), use_cache=False,
                          attention_mask=None if mask is None else mask.to(self.device),
                          position_ids=None if position_ids is None else position_ids.to(self.device))
        return out.last_hidden_state

    def _forward_rows(self, rows: list[list[int]], ids: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor,
                      out: torch.Tensor) -> None:
        """One forward over `rows` (each a list of caption indices laid end to end), pooled into `out`.

        One caption per row: right-padded rows with an attention mask. Several: no mask, position ids restarting
        at 0 for each caption, from which transformers builds a block-diagonal causal mask (packed sequences), so
        a caption attends only to itself and gets the same hidden states as alone. The padding at a row's end is
        one more such sequence that no caption sees. `owner` names, per token, the caption whose pooled embedding
        it enters (-1: none), which serves both poolings: mean keeps every token after `start`, last only the last.
        """
        captions, row_of, offset = _row_layout(rows, lengths)
        n = lengths[captions]
        row_len = torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, n)
        width = int(row_len.max())
        packed = len(captions) > len(rows)
        # One entry per real token: its caption's place in `captions`, its position k in the caption, its cell.
        which = torch.repeat_interleave(torch.arange(len(captions)), n)
        k = torch.arange(len(which)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        cap, r, col = captions[which], row_of[which], offset[which] + k
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        x[r, col] = ids[cap, k]
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        mask[r, col] = 1
        # Padding after a row's last caption counts positions from 0 again: one more sequence nobody attends to.
        cols = torch.arange(width).expand(len(rows), width)
        positions = cols - row_len[:, None]
        positions[r, col] = k
        first = start[cap] if self.cfg.pooling == "mean" else n[which] - 1
        owner = torch.full((len(rows), width), -1, dtype=torch.long)
        owner[r, col] = torch.where(k >= first, cap, -1)
        hidden = self._forward(x, None, positions) if packed else self._forward(x, mask)
        self.tokens_processed += len(rows) * width
        keep = (owner >= 0).flatten().to(self.device)
        owner = owner.flatten().to(self.device)[keep]
        sums = torch.zeros_like(out).index_add_(0, owner, hidden.reshape(-1, hidden.shape[-1])[keep].float())
        counts = torch.bincount(owner, minlength=out.shape[0])
        captions = captions.to(self.device)
        out[captions] = sums[captions] / counts[captions, None]

    def _mean_start(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per row, 1 where mean pooling skips a leading BOS token, else 0.

        Under causal attention the BOS position sees only itself, so its hidden state is the same for every caption:
        it carries no information. Llama-family models also give it a huge norm (an attention sink: ~25000 vs ~170 for
        other tokens in SmolLM2's middle layers), which would make every caption's mean nearly the same vector.
        """
        bos = self.tokenizer.bos_token_id if self.cfg.pooling == "mean" else None
        if bos is None:
            return torch.zeros_like(lengths)
        return ((ids[:, 0] == bos) & (lengths > 1)).long() if ids.shape[1] else torch.zeros_like(lengths)

    @torch.no_grad()  # not inference_mode: ZeRO-3's linear wrapper breaks under it
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, L] (any padding side; B may be 0) -> float32 [B, hidden] on `self.device`.

        Pooling of hidden_states[layer]: mean over each caption's tokens (a leading BOS excluded, see `_mean_start`)
        or its last token; then optional L2 normalisation. Captions longer than `max_len` are truncated.
        Packed (`packing`), captions are laid end to end in rows of `max_len` tokens (`pack_rows`) and each forward
        takes `chunk_size` rows. Otherwise each forward takes `chunk_size` captions, one per row, trimmed to the
        longest of them; with `bucket_by_length` the captions are sorted by length first. Sharded, this is a
        collective: ranks agree on the largest forward count and the ones with fewer run 1-token dummy forwards.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"embed: input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must be the same [B, L] shape")
        ids, mask = pack_right(input_ids.cpu(), attention_mask.cpu())
        lengths = mask.sum(1).clamp(max=self.cfg.max_len)
        if (lengths == 0).any():
            raise ValueError("embed: a caption has no tokens (attention_mask all zero)")
        n = ids.shape[0]
        start = self._mean_start(ids, lengths)
        if self.packing:
            forwards = _chunks(pack_rows(lengths, self.cfg.max_len), self.cfg.chunk_size)
        else:
            order = torch.argsort(lengths, descending=True, stable=True) if self.cfg.bucket_by_length else torch.arange(n)
            forwards = [[[int(i)] for i in chunk] for chunk in _chunks(order.tolist(), self.cfg.chunk_size)]
        # Agree on the number of forwards before the first one: a collective between forwards would pair up with
        # another rank's parameter all-gathers. Over the world even when sharded within nodes: DeepSpeed checks its
        # module trace with world broadcasts at the end of the first forwards, so every node must run as many.
        missing = (dist.all_reduce_max(len(forwards)) if self.sharded else len(forwards)) - len(forwards)
        out = torch.empty(n, self.hidden_size, dtype=torch.float32, device=self.device)
        for rows in forwards:
            self._forward_rows(rows, ids, lengths, start, out)
        if n:
            self.tokens_padded += n * int(lengths.max())
        dummy = torch.ones(1, 1, dtype=torch.long)
        for _ in range(missing):
            self._forward(dummy, dummy)
        if self.cfg.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out


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
    tokenizer = load_tokenizer(cfg.path if cfg.path is not None else RANDOM_TEACHER_TOKENIZER)
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
