"""The run configuration's sections, each field with the values it accepts.

Every int and float field carries a `Range`, every string that selects a behaviour carries its choices, and each
section checks its own fields (`check_section`) before any rule that combines sections, so no later arithmetic
(batch divisions, `step % every`) sees a nonsensical value. Only what a field alone can tell lives here: rules that
combine sections, or need the data, the filesystem or the device, are in kclip/validate.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: finite, from `low` to `high`, each end included unless marked open."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "finite"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


FINITE = Range()
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
# faiss takes its seed as a C int, the narrowest of the seeds' consumers (numpy refuses negative ones).
SEED = Range(0, 2**31 - 1)

DISTILL_KINDS = ("cosine", "mse", "relational", "contrastive")
DISTILL_TARGETS = ("raw", "centered", "whitened")
CONCEPT_HEAD_KINDS = ("image", "text", "joint")
KMEANS_BACKENDS = ("auto", "faiss", "torch")
CACHE_DTYPES = ("fp32", "bf16", "fp16")


def num(default, valid: Range):
    """A numeric field and its valid values."""
    return field(default=default, metadata={"range": valid})


def one_of(default, allowed: tuple):
    """A field that selects one of `allowed`."""
    return field(default=default, metadata={"choices": allowed})


def check_section(section, prefix: str) -> None:
    """Raise ConfigError naming the first field of `section` outside its range or choices."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}{f.name}"
        valid = f.metadata.get("range")
        if valid is not None and value is not None and value not in valid:
            raise ConfigError(f"{key}: must be {valid}, got {value!r}")
        allowed = f.metadata.get("choices")
        if allowed is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in allowed:
                    raise ConfigError(f"{key}: {item!r} is not one of {list(allowed)}")


@dataclass
class StudentConfig:
    # A Hugging Face CLIPModel folder to fine-tune (the paper's setting). When set, the tower fields below are unused.
    hf_clip: str | None = None
    image_model: str = "vit_base_patch16_224"  # any timm model name
    image_model_kwargs: dict = field(default_factory=dict)  # e.g. depth/embed_dim for tiny test towers
    pretrained_image: bool = False
    image_size: int = num(224, AT_LEAST_1)
    # "auto" (hf_clip's own tokenizer with hf_clip, else "byte"), "byte" (file-free byte-level), "teacher", an HF
    # folder, or a .gguf file
    tokenizer: str = "auto"
    # random | teacher: token embeddings from the teacher's input embeddings, PCA-reduced to text_width (needs
    # tokenizer=teacher), so words absent from the training captions still start from what the teacher knows of them
    token_init: str = one_of("random", ("random", "teacher"))
    freeze_token_embeddings: bool = False  # with token_init=teacher: keep those embeddings fixed
    text_width: int = num(512, AT_LEAST_1)
    text_layers: int = num(12, AT_LEAST_1)
    text_heads: int = num(8, AT_LEAST_1)
    text_max_len: int = num(77, AT_LEAST_1)
    embed_dim: int = num(512, AT_LEAST_1)
    # log of the logit multiplier: any real number; clamped by max_logit_scale (CLIP caps the temperature at 100)
    init_logit_scale: float = num(math.log(1 / 0.07), FINITE)
    max_logit_scale: float = num(math.log(100.0), FINITE)
    distill_hidden: int = num(64, AT_LEAST_1)  # projector: embed_dim -> distill_hidden -> teacher hidden size
    concept_hidden: int = num(64, AT_LEAST_1)
    concept_heads: list = field(default_factory=lambda: list(CONCEPT_HEAD_KINDS),
                                metadata={"choices": CONCEPT_HEAD_KINDS})
    grad_checkpointing: bool = False


@dataclass
class TeacherConfig:
    path: str | None = None  # HF folder, or a .gguf file (folder/name.gguf)
    random_config: dict | None = None  # LlamaConfig kwargs: a random teacher built in memory (smoke runs, tests)
    # hidden_states index to pool; negative counts from the end, its bound needs the model (checked when it loads)
    layer: int = num(-1, FINITE)
    pooling: str = one_of("mean", ("mean", "last"))  # mean over non-pad tokens | last non-pad token
    normalize: bool = True
    max_len: int = num(77, AT_LEAST_1)
    dtype: str = one_of("auto", ("auto", "fp32", "bf16"))  # auto = bf16 on GPU, fp32 on CPU
    chunk_size: int = num(64, AT_LEAST_1)  # rows per teacher forward: packed rows of max_len tokens, or captions
    packing: bool = True  # several captions per row (block-diagonal attention): no padding computed, fewer forwards
    bucket_by_length: bool = True  # without packing: sort captions by length so chunks carry little padding
    offload: str = one_of("none", ("none", "cpu", "nvme"))  # ZeRO-3 parameter offload
    # the ranks one sharded teacher is partitioned over: all of them, or each node's (a copy per node, so each forward
    # all-gathers over NVLink instead of the network, for 1/ranks-per-node of the teacher per GPU instead of 1/world)
    shard_within: str = one_of("world", ("world", "node"))
    nvme_path: str | None = None
    # a .gguf teacher: save it de-quantised, once, as a Hugging Face folder under $KCLIP_CACHE (~/.cache/kclip), which
    # later starts load instead (kclip.gguf_files); false: write no copy (one already there is still read)
    convert_gguf: bool = True
    # how long a process waits for another converting the same .gguf (a 7B takes minutes) before it fails: a holder
    # stuck on another node would otherwise hold every waiting rank until dist.timeout_s, with nothing naming it
    convert_timeout_s: float = num(1800.0, POSITIVE)
    seed: int = num(0, SEED)  # for random_config
    cache: bool = True  # keep teacher embeddings on disk by sample id: later epochs skip the teacher
    cache_dir: str | None = None  # default <run>/teacher_cache; share it between runs with the same teacher and data
    # how cached rows are stored: bf16 and fp16 halve the cache; part of its key, so never read in another dtype
    cache_dtype: str = one_of("fp32", CACHE_DTYPES)

    def check(self) -> None:
        if self.offload == "nvme" and not self.nvme_path:
            raise ConfigError("teacher.nvme_path: required when teacher.offload=nvme")
        if self.shard_within == "node" and self.offload == "nvme":
            # the node copy is made from a world-sharded load, and the second ZeRO-3 NVMe swapper would delete the
            # first one's swap folder (DeepSpeed clears it when it starts)
            raise ConfigError("teacher.shard_within: node cannot be combined with teacher.offload=nvme; use "
                              "teacher.offload=cpu or teacher.shard_within=world")
        if self.cache_dtype == "fp16" and not self.normalize:
            # unnormalised hidden states can exceed float16's largest value: stored as inf, every epoch a miss
            raise ConfigError("teacher.cache_dtype: fp16 needs teacher.normalize=true (unnormalised embeddings can "
                              "exceed float16's range, 65504); use bf16")


@dataclass
class LossConfig:
    # Paper: alpha = gamma = 1, beta = 0.01, in the order distillation, concept, contrastive. 0 turns a term off.
    distill_weight: float = num(1.0, NON_NEGATIVE)
    concept_weight: float = num(0.01, NON_NEGATIVE)
    contrastive_weight: float = num(1.0, NON_NEGATIVE)
    # cosine | mse (row-wise) | relational | contrastive (over the gathered batch)
    distill_kind: str = one_of("cosine", DISTILL_KINDS)
    # raw | centered | whitened: the teacher embedding minus its running mean (whitened)
    distill_target: str = one_of("raw", DISTILL_TARGETS)
    distill_tau: float = num(0.1, POSITIVE)  # temperature of the relational and contrastive forms
    local_loss: bool = False  # local rows x global columns instead of the full global logits
    contrastive_chunk: int = num(0, NON_NEGATIVE)  # >0: chunked (tiled) contrastive loss over blocks of columns

    def check(self) -> None:
        if self.contrastive_weight == 0 and self.distill_weight == 0 and self.concept_weight == 0:
            raise ConfigError("loss: all three weights are 0; nothing would be trained")


@dataclass
class ConceptConfig:
    k: int = num(100, Range(2))  # one concept would make every soft label 1 and the concept loss constant
    tau: float = num(0.05, POSITIVE)  # soft label temperature over cosine similarity to centroids
    niter: int = num(20, AT_LEAST_1)
    buffer_size: int = num(4096, AT_LEAST_1)  # recent teacher embeddings kept per rank for (re)fitting
    # steps collecting teacher embeddings before the first fit (no concept loss before); >= 1 with concept
    # learning on, checked with the rules that combine sections
    warmup_steps: int = num(20, NON_NEGATIVE)
    recompute_every: int = num(1000, NON_NEGATIVE)  # 0 = fit once
    warm_start: bool = True  # re-fits start from the current centroids (stable ids, faster convergence)
    center: bool = True  # subtract the mean teacher embedding before clustering and soft labels (anisotropy)
    seed: int = num(0, SEED)
    # k-means: auto = torch on a GPU rank's device, faiss (faiss-cpu) on the CPU
    backend: str = one_of("auto", KMEANS_BACKENDS)


@dataclass
class DataConfig:
    train: str | None = None  # MDS folder written by `kclip prepare`
    val: str | None = None
    num_workers: int = num(2, NON_NEGATIVE)  # 0 = load in the training process
    shuffle: bool = True
    # fixed so the sample order is independent of world size (elastic resume)
    num_canonical_nodes: int = num(1, AT_LEAST_1)


@dataclass
class OptimConfig:
    lr: float = num(5e-4, NON_NEGATIVE)  # 0 freezes the weights: a choice (e.g. to time the data path), not a crash
    weight_decay: float = num(0.2, NON_NEGATIVE)
    # Adam's moment decays: 1 would never forget the first gradient
    beta1: float = num(0.9, Range(0, 1, high_open=True))
    beta2: float = num(0.98, Range(0, 1, high_open=True))
    eps: float = num(1e-6, POSITIVE)  # divides by sqrt(v) + eps
    warmup_steps: int = num(100, NON_NEGATIVE)
    min_lr_ratio: float = num(0.0, Range(0, 1))  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = num(1.0, NON_NEGATIVE)  # 0 = no clipping (DeepSpeed's convention)
    # The concept heads' own optimizer groups (kclip/train/engine.py): at beta = 0.01 their gradients are ~1e-4 of
    # the towers', so the towers' lr, eps and clipping can leave them all but frozen (BENCHMARKS.md, concept learning).
    head_lr_scale: float = num(1.0, NON_NEGATIVE)  # the heads' lr = the scheduled lr x this
    head_eps: float | None = num(None, POSITIVE)  # None = eps
    # None: clipped with the towers by one global norm (DeepSpeed's). A number: the towers are clipped to grad_clip
    # by their own norm and the heads to this by theirs (0 = not clipped), so a large contrastive gradient no longer
    # scales the heads' update down.
    head_grad_clip: float | None = num(None, NON_NEGATIVE)


@dataclass
class TrainConfig:
    steps: int = num(1000, AT_LEAST_1)
    global_batch_size: int = num(256, AT_LEAST_1)  # samples per optimizer step over all ranks
    # per rank per forward; None = global / world (no accumulation); smaller: GradCache. 0 would silently mean None.
    micro_batch_size: int | None = num(None, AT_LEAST_1)
    seed: int = num(0, SEED)
    precision: str = one_of("auto", ("auto", "fp32", "bf16"))  # auto = bf16 on GPU, fp32 on CPU
    zero_stage: int = one_of(1, (0, 1, 2))  # student engine; 0: every rank keeps the whole optimizer state
    compile: bool = False
    keep_freed_memory: bool = True  # CPU training: glibc's malloc keeps what a step frees for the next (train/memory.py)
    max_bad_steps: int = num(5, AT_LEAST_1)  # consecutive non-finite steps before the run stops


@dataclass
class LogConfig:
    every: int = num(10, AT_LEAST_1)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "kclip"


@dataclass
class CheckpointConfig:
    every: int = num(500, AT_LEAST_1)
    keep_last: int = num(2, NON_NEGATIVE)  # 0 = keep every checkpoint


@dataclass
class EvalConfig:
    every: int = num(0, NON_NEGATIVE)  # 0 = only at the end
    batch_size: int = num(64, AT_LEAST_1)


@dataclass
class DistConfig:
    # bound on every collective, so a dead rank fails the run instead of hanging it
    timeout_s: float = num(600.0, POSITIVE)
    # bound on the start-up rendezvous alone: ranks of a loaded node or a staggered SLURM start may join minutes apart,
    # which must not force a long collective timeout on the whole run
    rendezvous_timeout_s: float = num(900.0, POSITIVE)


@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def needs_teacher(self) -> bool:
        """With distillation and concept weights at 0 the run is plain CLIP and never loads the teacher."""
        return self.loss.distill_weight > 0 or self.loss.concept_weight > 0

    def sections(self):
        """(key prefix, section) for every section, in declaration order."""
        return [(f"{f.name}.", getattr(self, f.name)) for f in dataclasses.fields(self)]

    def check(self) -> None:
        """Each section's own rules: ranges and choices first, then its `check()` if it has one."""
        for prefix, section in self.sections():
            check_section(section, prefix)
        for _, section in self.sections():
            if hasattr(section, "check"):
                section.check()
