"""Evaluation of a student on an MDS split: embeddings gathered from all ranks, then retrieval metrics.

Streaming pads every rank to the same sample count by repeating samples; rows are de-duplicated by their global
sample index before any metric is computed, so each pair counts exactly once.

Which rows show the same image, and which captions are the same text (see kclip.retrieval.metrics for the rule):
- image key = the sample id without the `#k` suffix that `kclip prepare` gives the 2nd, 3rd... caption of an image;
- text key = the raw caption string, exactly (no case or whitespace folding): only identical texts are merged. Not
  the student's token ids: captions that differ only past its truncation limit are different captions, and keying
  them as one would credit a model for a collision its own truncation made (on the demo split with the smoke
  config's 48-byte limit, 454 distinct captions fell to 442 keys and R@5/R@10 rose 1.3-1.5 points).
Keys are 63-bit hashes so they travel through the same tensor all-gather as the embeddings.
"""
from __future__ import annotations

import hashlib
import re

import torch
import torch.distributed

from kclip import console, dist
from kclip.retrieval.metrics import retrieval_metrics

CAPTION_SUFFIX = re.compile(r"#\d+$")


def image_id(sample_id: str) -> str:
    """`photos/a.jpg#2` -> `photos/a.jpg`: the id of the image a (possibly repeated) record shows."""
    return CAPTION_SUFFIX.sub("", sample_id)


def stable_hash(data: bytes) -> int:
    """A 63-bit non-negative hash, identical in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def caption_key(caption: str) -> int:
    """The text key of a caption: equal exactly when the raw strings are equal."""
    return stable_hash(caption.encode("utf-8"))


def gather_objects(items: list) -> list:
    """Concatenate per-rank Python lists in rank order (the order all_gather_rows uses)."""
    if dist.world_size() == 1:
        return items
    parts = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


@torch.no_grad()
def embed_split(model, loader, device) -> dict:
    """Embeddings and keys of every sample in the loader's split, de-duplicated, sorted by index, identical on all
    ranks: image, text [n, d] (L2-normalised float32), index, image_key, text_key [n] (long), caption [n] str; plus
    `labels` {column: [n] str} when the batches carry labels."""
    was_training = model.training
    model.eval()
    images, texts, indices, image_keys, txt_keys = [], [], [], [], []
    labels: dict[str, list] = {}
    captions: list[str] = []
    for batch in console.progress(len(loader), "embedding the split", "batch", iterable=loader, leave=False):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        images.append(model.encode_image(batch["pixels"].to(device)).float().cpu())
        texts.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
        indices.append(batch["index"].cpu())
        image_keys.append(torch.tensor([stable_hash(image_id(s).encode()) for s in batch["sample_id"]]))
        txt_keys.append(torch.tensor([caption_key(c) for c in batch["caption"]], dtype=torch.long))
        for column, values in batch.get("labels", {}).items():
            labels.setdefault(column, []).extend(values)
        captions.extend(batch["caption"])
    model.train(was_training)
    image = dist.all_gather_rows(torch.cat(images))
    text = dist.all_gather_rows(torch.cat(texts))
    index = dist.all_gather_rows(torch.cat(indices))
    image_key = dist.all_gather_rows(torch.cat(image_keys))
    text_key = dist.all_gather_rows(torch.cat(txt_keys))
    order = torch.argsort(index, stable=True)
    sorted_index, first = index[order], torch.ones(len(order), dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    out = {"image": image[keep], "text": text[keep], "index": sorted_index[first],
           "image_key": image_key[keep], "text_key": text_key[keep]}
    keep_list = keep.tolist()

    def gathered(values: list) -> list:
        values = gather_objects(values)
        return [values[i] for i in keep_list]

    if labels:
        out["labels"] = {column: gathered(values) for column, values in labels.items()}
    out["caption"] = gathered(captions)
    return out


def evaluate_split(model, loader, device) -> dict[str, float]:
    """Retrieval metrics (kclip.retrieval.metrics) over the split, and `num_samples` (distinct pairs)."""
    emb = embed_split(model, loader, device)
    return {**retrieval_metrics(emb["image"], emb["text"], emb["image_key"], emb["text_key"]),
            "num_samples": int(emb["index"].numel())}
