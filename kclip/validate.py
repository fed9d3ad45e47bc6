"""Checks that need no process group: run in the launching process so a bad config fails in seconds, with one line
naming the key, instead of after every rank has started (or, worse, as a hang). Each section's own rules live with
the section (kclip/config/schema.py) and run first, the filesystem's in kclip/config/preflight.py; what is here
combines sections, or asks the tokenizer, the student's towers or the device. It sits above the models it builds on
the meta device, which is why it is not part of kclip.config."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from kclip.config import Config, ConfigError, StudentConfig
from kclip.config.preflight import (
    POOLING_PROBES,
    TOKENIZER_FILES,
    check_mds,
    check_shard_within,
    check_teacher,
    model_config,
    weight_files,
)
from kclip.models.student import image_tower_kwargs
from kclip.tokenizers import load_tokenizer, student_tokenizer_spec

def batch_statistics_module(image_tower: torch.nn.Module) -> tuple[str, str] | None:
    """(name, class) of the first module that normalises by statistics of its batch, or None. BatchNorm in all its
    forms (timm's BatchNormAct2d, SyncBatchNorm) subclasses _BatchNorm; the running variance they keep marks the others
    (timm's EvoNorm2dB0)."""
    for name, module in image_tower.named_modules():
        if isinstance(module, _BatchNorm) or "running_var" in dict(module.named_buffers(recurse=False)):
            return name, type(module).__name__
    return None


def check_no_batch_statistics(st: StudentConfig, micro: int, per_rank: int) -> None:
    """GradCache is exact only for towers that treat each sample on its own: a BatchNorm tower would normalise each
    micro-batch by its own statistics, and update its running statistics twice per micro-batch (no-grad pass and
    re-run). The tower is built on the meta device: its module tree without memory or initialisation."""
    import timm

    try:
        with torch.device("meta"):
            tower = timm.create_model(st.image_model, num_classes=0, **image_tower_kwargs(st))
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError for an unknown name, TypeError for a bad kwarg
        raise ConfigError(f"student.image_model: timm cannot build {st.image_model!r} with "
                          f"student.image_model_kwargs {st.image_model_kwargs} ({type(e).__name__}: {e})") from None
    found = batch_statistics_module(tower)
    if found:
        raise ConfigError(f"train.micro_batch_size: {micro} splits the per-rank batch of {per_rank} into "
                          f"gradient-cached micro-batches, which are exact only without batch statistics, but "
                          f"student.image_model {st.image_model} has {found[1]} ({found[0]}); leave "
                          f"train.micro_batch_size unset (one micro-batch per step) or use a tower without batch "
                          f"statistics")


def validate(cfg: Config, world_size: int, *, local_world_size: int | None = None, cuda: bool | None = None) -> None:
    """Raise ConfigError for the first impossible setting. `world_size` is the number of ranks the run will have,
    `local_world_size` those on each node (default: all of them, one node)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    t, c, st = cfg.train, cfg.concepts, cfg.student
    cfg.check()
    if t.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by the world size {world_size}")
    per_rank = t.global_batch_size // world_size
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {per_rank}")
    if micro < per_rank and not st.hf_clip:  # a CLIP student's towers normalise per sample (LayerNorm)
        check_no_batch_statistics(st, micro, per_rank)
    if t.precision == "bf16" and not (cuda and torch.cuda.is_bf16_supported()):
        raise ConfigError("train.precision: bf16 needs a CUDA device with bf16 support; use auto or fp32 here")
    if cfg.teacher.dtype == "bf16" and not cuda:
        raise ConfigError("teacher.dtype: bf16 teacher needs a CUDA device; use auto or fp32 here")
    if cfg.needs_teacher:
        if not cfg.teacher.path and not cfg.teacher.random_config:
            raise ConfigError("teacher.path: required when loss.distill_weight or loss.concept_weight > 0")
        check_teacher(cfg.teacher)
        check_shard_within(cfg.teacher, world_size, local_world_size or world_size)
    if st.tokenizer == "teacher" and not cfg.teacher.path:
        raise ConfigError("student.tokenizer: 'teacher' needs teacher.path")
    if st.token_init == "teacher":
        if st.hf_clip:
            raise ConfigError("student.token_init: 'teacher' initialises the timm + CLIP text towers; student.hf_clip "
                              "brings its own pretrained embeddings")
        if st.tokenizer != "teacher":
            raise ConfigError("student.token_init: 'teacher' needs student.tokenizer=teacher (the embedding rows are "
                              "the teacher's tokens)")
        if not cfg.needs_teacher:  # the token-init ablation: the teacher is read for its embeddings alone
            check_teacher(cfg.teacher)
    if st.freeze_token_embeddings and st.token_init != "teacher":
        raise ConfigError("student.freeze_token_embeddings: only with student.token_init=teacher (frozen random "
                          "embeddings would never learn anything)")
    if st.hf_clip:
        check_hf_clip(cfg)
    n_train = check_mds("data.train", cfg.data.train, required=True)
    check_mds("data.val", cfg.data.val, required=False)
    if n_train < t.global_batch_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} exceeds the {n_train} training samples")
    if cfg.loss.concept_weight > 0:
        if c.warmup_steps < 1:
            raise ConfigError("concepts.warmup_steps: must be >= 1 (the first fit needs teacher embeddings)")
        # What the first fit will see: warm-up samples, bounded by the buffers and by the dataset itself.
        first_fit = min(c.warmup_steps * t.global_batch_size, c.buffer_size * world_size, n_train)
        if c.k > first_fit:
            raise ConfigError(
                f"concepts.k: {c.k} exceeds the {first_fit} teacher embeddings available for the first fit "
                f"(warmup_steps x global batch, buffer_size x ranks, dataset size)")


def load_student_tokenizer(cfg: Config):
    """The run's student tokenizer, or ConfigError naming student.tokenizer when it cannot be loaded."""
    spec = student_tokenizer_spec(cfg)
    if os.path.isdir(spec) and not any((Path(spec) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"student.tokenizer: {cfg.student.tokenizer!r} reads {spec}, which holds no tokenizer "
                          f"({' / '.join(TOKENIZER_FILES)}); save the model's tokenizer there or name one")
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student.tokenizer: cannot load {spec} ({' '.join(str(e).split())})") from e


def check_pooling(tokenizer, spec: str, text_config, max_len: int) -> None:
    """A tokenizer whose ids a Hugging Face CLIP text tower can embed and pool. The tower embeds a caption as the
    hidden state at its end-of-text token: the first position holding `eos_token_id`, or, in configs written before
    that field was fixed (eos_token_id == 2, as transformers tells them apart), the position of the largest id, which
    is end-of-text in CLIP's own vocabulary. A caption that does not end with that token is pooled elsewhere: with
    byte ids at position 0, so "a dog" and "apple pie" (same first byte) embed identically and nothing is learned."""
    if len(tokenizer) > text_config.vocab_size:
        raise ConfigError(f"student.tokenizer: {spec} has {len(tokenizer)} token ids but student.hf_clip embeds only "
                          f"{text_config.vocab_size}")
    legacy = text_config.eos_token_id == 2
    pooled = len(tokenizer) - 1 if legacy else text_config.eos_token_id
    where = (f"the caption's largest id (a config with eos_token_id 2), which must be this tokenizer's last id, "
             f"{pooled}") if legacy else f"eos_token_id {pooled}"
    for ids in tokenizer(list(POOLING_PROBES), truncation=True, max_length=max_len)["input_ids"]:
        if ids[-1] != pooled:
            raise ConfigError(f"student.tokenizer: {spec} ends a caption with id {ids[-1]}, but student.hf_clip pools "
                              f"the text at {where}, so captions would embed from the wrong token; use the CLIP "
                              f"folder's own tokenizer (student.tokenizer=auto)")


def check_hf_clip(cfg: Config) -> None:
    """A student.hf_clip folder that can be fine-tuned, read at student.text_max_len tokens by a tokenizer it can
    pool."""
    from transformers import CLIPConfig

    st = cfg.student
    if not os.path.isdir(st.hf_clip):
        raise ConfigError(f"student.hf_clip: no such folder {st.hf_clip}")
    model_type = model_config("student.hf_clip", st.hf_clip, expected="a Hugging Face CLIPModel folder").get("model_type")
    if model_type != "clip":
        raise ConfigError(f"student.hf_clip: {st.hf_clip} holds a {model_type!r} model, not a CLIPModel")
    if not weight_files(st.hf_clip):
        raise ConfigError(f"student.hf_clip: {st.hf_clip} holds no weights (*.safetensors or *.bin)")
    text_config = CLIPConfig.from_pretrained(st.hf_clip).text_config
    if st.text_max_len > text_config.max_position_embeddings:
        raise ConfigError(f"student.text_max_len: {st.text_max_len} exceeds student.hf_clip's "
                          f"{text_config.max_position_embeddings} text positions")
    check_pooling(load_student_tokenizer(cfg), student_tokenizer_spec(cfg), text_config, st.text_max_len)
