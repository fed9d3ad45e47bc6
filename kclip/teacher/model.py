"""The frozen Llama teacher: caption token ids -> one pooled embedding per caption.

Sharded (ZeRO-3 inference), every rank keeps 1/world of each weight (with `teacher.shard_within: node`, 1/ranks per
node: a copy per node) and all-gathers one layer at a time during the forward pass, so a 7B-70B decoder fits next to
the student. The weights are loaded already partitioned (a `HfDeepSpeedConfig` kept alive only while `from_pretrained`
runs makes it build the model under `deepspeed.zero.Init`), so no rank ever materialises the whole model. Because
every submodule all-gathers, a sharded `Teacher.embed` is a collective: every rank must run the same number of forward
passes, which `embed` guarantees by itself.

Unsharded (one process, no offload), it is a plain frozen module on the local device. Built by
kclip.teacher.load.build_teacher.
"""
from __future__ import annotations

import logging

import torch

from kclip import dist
from kclip.config import TeacherConfig
from kclip.teacher.packing import chunks, pack_right, pack_rows, row_layout

log = logging.getLogger(__name__)

# Captions of different lengths whose packed and single embeddings `Teacher.check_packing` compares.
PACKING_PROBE = ["a photo of a dog running on the grass", "two cats", "a red car parked by an old stone wall", "snow",
                 "people"]


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
        captions, row_of, offset = row_layout(rows, lengths)
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
            forwards = chunks(pack_rows(lengths, self.cfg.max_len), self.cfg.chunk_size)
        else:
            order = torch.argsort(lengths, descending=True, stable=True) if self.cfg.bucket_by_length else torch.arange(n)
            forwards = [[[int(i)] for i in chunk] for chunk in chunks(order.tolist(), self.cfg.chunk_size)]
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
