"""Run configuration: dataclasses loaded from YAML, overridden by `a.b.c=value`, validated before any process group.

Named configs ship in `kclip/configs/NAME.yaml`. Validation only looks at the config and the filesystem, so an
impossible setting fails in the launching shell with one line naming the key, before ranks start.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key."""


@dataclass
class StudentConfig:
    # A Hugging Face CLIPModel folder to fine-tune (the paper's setting). When set, the tower fields below are unused.
    hf_clip: str | None = None
    image_model: str = "vit_base_patch16_224"  # any timm model name
    image_model_kwargs: dict = field(default_factory=dict)  # e.g. depth/embed_dim for tiny test towers
    pretrained_image: bool = False
    image_size: int = 224
    tokenizer: str = "byte"  # "byte" (file-free byte-level), "teacher", an HF folder, or a .gguf file
    # random | teacher: token embeddings from the teacher's input embeddings, PCA-reduced to text_width (needs
    # tokenizer=teacher), so words absent from the training captions still start from what the teacher knows of them
    token_init: str = "random"
    freeze_token_embeddings: bool = False  # with token_init=teacher: keep those embeddings fixed
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_max_len: int = 77
    embed_dim: int = 512
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)  # CLIP clamps the temperature at 100
    distill_hidden: int = 64  # projector: embed_dim -> distill_hidden -> teacher hidden size
    concept_hidden: int = 64
    concept_heads: list = field(default_factory=lambda: ["image", "text", "joint"])
    grad_checkpointing: bool = False


@dataclass
class TeacherConfig:
    path: str | None = None  # HF folder, or a .gguf file (folder/name.gguf)
    random_config: dict | None = None  # LlamaConfig kwargs: a random teacher built in memory (smoke runs, tests)
    layer: int = -1  # hidden_states index to pool
    pooling: str = "mean"  # mean over non-pad tokens | last non-pad token
    normalize: bool = True
    max_len: int = 77
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    chunk_size: int = 64  # rows per teacher forward: packed rows of max_len tokens, or single captions
    packing: bool = True  # several captions per row (block-diagonal attention): no padding computed, fewer forwards
    bucket_by_length: bool = True  # without packing: sort captions by length so chunks carry little padding
    offload: str = "none"  # none | cpu | nvme (ZeRO-3 parameter offload)
    nvme_path: str | None = None
    seed: int = 0  # for random_config
    cache: bool = True  # keep teacher embeddings on disk by sample id: later epochs skip the teacher
    cache_dir: str | None = None  # default <run>/teacher_cache; share it between runs with the same teacher and data


@dataclass
class LossConfig:
    # Paper: alpha = gamma = 1, beta = 0.01, in the order distillation, concept, contrastive.
    distill_weight: float = 1.0
    concept_weight: float = 0.01
    contrastive_weight: float = 1.0
    distill_kind: str = "cosine"  # cosine | mse (row-wise) | relational | contrastive (over the gathered batch)
    distill_target: str = "raw"  # raw | centered | whitened: the teacher embedding minus its running mean (whitened)
    distill_tau: float = 0.1  # temperature of the relational and contrastive forms
    local_loss: bool = False  # local rows x global columns instead of the full global logits
    contrastive_chunk: int = 0  # >0: chunked (tiled) contrastive loss over blocks of this many columns


@dataclass
class ConceptConfig:
    k: int = 100
    tau: float = 0.05  # soft label temperature over cosine similarity to centroids
    niter: int = 20
    buffer_size: int = 4096  # recent teacher embeddings kept per rank for (re)fitting
    warmup_steps: int = 20  # steps collecting teacher embeddings before the first fit (no concept loss before)
    recompute_every: int = 1000  # 0 = fit once
    warm_start: bool = True  # re-fits start from the current centroids (stable ids, faster convergence)
    center: bool = True  # subtract the mean teacher embedding before clustering and soft labels (anisotropy)
    seed: int = 0


@dataclass
class DataConfig:
    train: str | None = None  # MDS folder written by `kclip prepare`
    val: str | None = None
    num_workers: int = 2
    shuffle: bool = True
    num_canonical_nodes: int = 1  # fixed so the sample order is independent of world size (elastic resume)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 256  # samples per optimizer step over all ranks
    micro_batch_size: int | None = None  # per rank per forward; None = global / world (no accumulation); smaller: GradCache
    seed: int = 0
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU | fp32 | bf16
    zero_stage: int = 1  # student engine: 1 or 2
    compile: bool = False
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "kclip"


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 2


@dataclass
class EvalConfig:
    every: int = 0  # 0 = only at the end
    batch_size: int = 64


@dataclass
class DistConfig:
    timeout_s: float = 600.0  # bound on every collective, so a dead rank fails the run instead of hanging it


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


# ---------------------------------------------------------------------------------------------------------------
# Loading, overriding, saving


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's float syntax. PyYAML implements YAML 1.1, where a float needs a dot and a signed
    exponent, so `1e-4` or `5e-4` (how learning rates are written) load as strings. Fixing the resolver rather than
    coercing strings in `_check_type` also covers numbers nested in dict fields (`teacher.random_config`, which goes
    to transformers as is) and keeps a quoted "1e-4" a string, as YAML means it."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
# PyYAML's float pattern with the dot optional before an exponent and the exponent's sign optional.
_FLOAT_1_2 = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
# Replaced in place: the float pattern is tried before the int one for the same first characters, as in PyYAML.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT_1_2 if tag == _FLOAT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_yaml(text: str | bytes, what: str, column_offset: int = 0):
    """`text` as YAML; a syntax error raises one ConfigError line: `what`, then the line and column (the first line's
    columns shifted by `column_offset`, so they count from where the user's text starts)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
        raise ConfigError(f"{what} at line {mark.line + 1}, column {column}: {e.problem or e.context}") from e
    except yaml.YAMLError as e:  # e.g. bytes that are not UTF-8: the reader's message already gives the position
        raise ConfigError(f"{what}: {' '.join(str(e).split())}") from e


def _check_type(key: str, annotation: str, value):
    """Coerce a YAML value to the field's annotated type, or raise naming the key."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{key}: must not be null")
    kinds = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list}
    allowed = [kinds[t.strip()] for t in annotation.split("|") if t.strip() in kinds]
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
        return value
    raise ConfigError(f"{key}: expected {annotation}, got {value!r}")


def _update(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key (valid: {', '.join(sorted(fields))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _update(current, value, f"{key}.")
        else:
            setattr(obj, name, _check_type(key, fields[name].type, value))


def apply_override(cfg: Config, override: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML (numbers, booleans, null, lists, mappings)."""
    if "=" not in override:
        raise ConfigError(f"{override}: overrides look like section.key=value")
    dotted, raw = override.split("=", 1)
    nested: dict = _parse_yaml(raw, f"{dotted.strip()}: invalid YAML in override {override!r}",
                              column_offset=len(dotted) + 1) if raw != "" else ""
    for part in reversed(dotted.strip().split(".")):
        nested = {part: nested}
    _update(cfg, nested)


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"--config: {name_or_path!r} is neither a YAML file nor a named config ({', '.join(names)})")
    return named


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    cfg = Config()
    path = resolve_config_path(name_or_path)
    # Bytes: the YAML reader decodes them itself, so a file that is not UTF-8 is one ConfigError line, too.
    _update(cfg, _parse_yaml(path.read_bytes(), f"--config: invalid YAML in {path}") or {})
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _update(cfg, data)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff_configs(a: Config, b: Config, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (used to refuse resuming under a changed config)."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            out += diff_configs(va, vb, f"{prefix}{f.name}.")
        elif va != vb:
            out.append(f"{prefix}{f.name}: {va!r} -> {vb!r}")
    return out
