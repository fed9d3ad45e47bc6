"""Batches for training and evaluation from the MDS datasets of kclip.data.datasets: samples collated, captions
tokenised for the student (and the teacher), in loaders that resume where they stopped (see kclip.data.datasets for
the order and its resumption).

Per-sample work is kept to what each sample needs (a loader core per GPU is the budget at scale): the crop's random
numbers come from a counter-based generator at (seed, epoch, index) rather than a reseeded torch RNG, samples stay
uint8 until the collate normalises the whole batch in one vectorised pass.
"""
from __future__ import annotations

import multiprocessing

import numpy as np
import torch
from streaming import StreamingDataLoader

from kclip.data.datasets import CaptionDataset, CaptionImageDataset, before_first_dataset
from kclip.data.transforms import normalize
from kclip.tokenizers import load_tokenizer


def _worker_start_method(num_workers: int) -> str | None:
    """Fork workers where the OS can: they only decode and tokenise on the CPU, and a forked worker starts in
    milliseconds, while a spawned one (the default inside spawned processes, and forkserver on Python 3.14+)
    re-imports torch and transformers at every epoch, which takes seconds to a minute."""
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None



def _resolve(tokenizer):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def tokenize(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, truncated): right-padded to the longest caption after truncation to `max_len`.

    Only a caption that comes out exactly `max_len` long can have been truncated; those few are tokenised again in
    full to tell (tokenizers differ in where they put special tokens, so only the tokenizer itself can say).
    """
    enc = tokenizer(
        captions, truncation=True, max_length=max_len, padding="longest", padding_side="right", return_tensors="pt"
    )
    mask = enc["attention_mask"].long()
    truncated = torch.zeros(len(captions), dtype=torch.long)
    at_limit = (mask.sum(1) == max_len).nonzero().flatten().tolist()
    if at_limit:
        full = tokenizer([captions[i] for i in at_limit], add_special_tokens=True)["input_ids"]
        truncated[at_limit] = torch.tensor([len(ids) > max_len for ids in full], dtype=torch.long)
    return enc["input_ids"].long(), mask, truncated


class Collate:
    """Picklable collate: stacks pixels and tokenises captions for the student (and the teacher, if any).

    Tokenizers are objects or `load_tokenizer` specs. Specs are loaded here, in the training process, so a bad spec
    fails at build time and forked workers inherit the loaded tokenizer instead of re-reading it every epoch.
    """

    def __init__(self, student_tokenizer, student_max_len: int, teacher_tokenizer=None, teacher_max_len: int = 77,
                 label_columns: tuple[str, ...] = ()):
        self.student_tokenizer = _resolve(student_tokenizer)
        self.student_max_len = student_max_len
        self.teacher_tokenizer = None if teacher_tokenizer is None else _resolve(teacher_tokenizer)
        self.teacher_max_len = teacher_max_len
        self.label_columns = label_columns

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        ids, mask, truncated = tokenize(self.student_tokenizer, captions, self.student_max_len)
        batch = {
            "pixels": normalize(torch.from_numpy(np.stack([s["pixels"] for s in samples]))),
            "input_ids": ids,
            "attention_mask": mask,
        }
        if self.teacher_tokenizer is not None:
            t_ids, t_mask, t_truncated = tokenize(self.teacher_tokenizer, captions, self.teacher_max_len)
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = t_ids, t_mask
            truncated = truncated | t_truncated
        batch["sample_id"] = [s["sample_id"] for s in samples]
        # The raw text, not only its truncated token ids: evaluation tells captions apart by it.
        batch["caption"] = captions
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        if self.label_columns:
            batch["labels"] = {c: [s["labels"][c] for s in samples] for c in self.label_columns}
        batch["replaced"] = torch.tensor([s["replaced"] for s in samples], dtype=torch.long)
        batch["truncated"] = truncated
        return batch


class CaptionCollate:
    """Picklable collate for `CaptionDataset`: teacher token ids of the captions, their indices and truncation flags."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = _resolve(tokenizer)
        self.max_len = max_len

    def __call__(self, samples: list[dict]) -> dict:
        ids, mask, truncated = tokenize(self.tokenizer, [s["caption"] for s in samples], self.max_len)
        return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "truncated": truncated,
                "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


def build_caption_loader(data_dir: str, *, batch_size: int, tokenizer, max_len: int,
                         num_workers: int = 2) -> StreamingDataLoader:
    """Every caption of `data_dir` once, in index order, split across ranks (streaming repeats a few samples so that
    ranks get equal counts; the last batch may be partial)."""
    before_first_dataset(data_dir)
    return StreamingDataLoader(
        CaptionDataset(data_dir, batch_size=batch_size), batch_size=batch_size,
        collate_fn=CaptionCollate(tokenizer, max_len), num_workers=num_workers,
        multiprocessing_context=_worker_start_method(num_workers),
    )


def build_loader(
    data_dir: str,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    student_tokenizer,
    student_max_len: int,
    teacher_tokenizer=None,
    teacher_max_len: int = 77,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 2,
    num_canonical_nodes: int = 1,
    label_columns: list[str] | tuple[str, ...] | None = None,
) -> StreamingDataLoader:
    """A loader over the local MDS folder `data_dir`; `batch_size` is per rank.

    Training batches are all full (drop_last). Evaluation (`train=False`) keeps the last partial batch so every
    sample is scored: streaming gives each rank the same sample count, so the partial batch has the same size on every
    rank and the gathered embeddings still line up.

    Keep `seed`, `shuffle` and `num_canonical_nodes` fixed across a run and its resumptions: they define the order.
    """
    before_first_dataset(data_dir)
    label_columns = tuple(label_columns or ())
    dataset = CaptionImageDataset(
        data_dir,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        seed=seed,
        shuffle=shuffle,
        num_canonical_nodes=num_canonical_nodes,
        label_columns=label_columns,
    )
    collate = Collate(student_tokenizer, student_max_len, teacher_tokenizer, teacher_max_len, label_columns)
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context=_worker_start_method(num_workers),
        # Worker base seeds come from this generator instead of torch's global RNG, so iterating the loader never
        # shifts the training process's random stream (dropout, init) and a resumed run draws the same numbers.
        generator=torch.Generator().manual_seed(seed),
    )
