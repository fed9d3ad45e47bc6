"""The caption EM probe with a pretrained decoder in place of stage 1 (`kclip eval --em-decoder PATH`), closer to
the paper's frozen T5 decoder: a Hugging Face causal-LM folder or a `.gguf` file (loaded through kclip's converted
copy, as the teacher is: kclip.gguf_files), frozen.

The frozen embedding e reaches the LM as a prefix of k = cfg.prefix_tokens soft tokens:
    P = LayerNorm(reshape(W standardise(e) + b, [k, H]))   (H: the LM's hidden size; LayerNorm over H, its gain
                                                          initialised to the input embeddings' std)
    inputs_embeds = [embed(BOS); P; embed(caption tokens); embed(EOS)]  (BOS: when the tokenizer has one),  loss on the caption tokens and EOS (teacher forcing),
only W, b and the LayerNorm trained, on the training captions; EM = greedy decoding (KV cache) from P alone, up to the
first EOS, decodes to the held-out caption's text exactly.
Seq2seq models (T5) would take P as encoder states; only causal LMs are wired here. A step runs the whole LM forward
and backward: minutes per student on a GPU, hours on 2 CPU cores for a full run (the CPU test uses a few captions).
When the decoder is also the teacher, its rows share the teacher's own language model: see README.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from kclip.console import progress
from kclip.eval.protocol import ProbeConfig

log = logging.getLogger(__name__)


def load_lm(path: str, device="cpu"):
    """(frozen causal LM in float32, its tokenizer) from an HF folder or a .gguf file."""
    from transformers import AutoModelForCausalLM

    from kclip import gguf_files
    from kclip.tokenizers import load_tokenizer

    folder, gguf_file = gguf_files.split_gguf(gguf_files.resolve(path, convert=True))
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, load_tokenizer(path)


class Prefix(nn.Module):
    def __init__(self, emb: torch.Tensor, k: int, width: int, scale: float):
        super().__init__()
        self.register_buffer("mean", emb.mean(dim=0))
        self.register_buffer("std", emb.std(dim=0, correction=0).clamp(min=1e-6 * float(emb.std()) + 1e-12))
        self.k, self.width = k, width
        self.linear = nn.Linear(emb.shape[1], k * width)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.norm.weight.fill_(scale)

    def forward(self, e):
        return self.norm(self.linear((e - self.mean) / self.std).view(len(e), self.k, self.width))


def with_bos(model, tokenizer, prefix: torch.Tensor) -> torch.Tensor:
    """[BOS embedding; prefix] when the tokenizer has a BOS: a Llama LM's first position is its attention sink, which
    a soft token put there disturbs (SmolLM2's loss stayed at the uniform 10.8 nats without it)."""
    if tokenizer.bos_token_id is None:
        return prefix
    bos = model.get_input_embeddings()(torch.tensor([tokenizer.bos_token_id], device=prefix.device))
    return torch.cat([bos[None].expand(len(prefix), -1, -1), prefix], dim=1)


def caption_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    return [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in captions]


def train_prefix(model, tokenizer, emb: torch.Tensor, captions: list[str], cfg: ProbeConfig) -> tuple[Prefix, list]:
    """(trained Prefix, batch losses)."""
    device = next(model.parameters()).device
    table = model.get_input_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = Prefix(emb.float(), cfg.prefix_tokens, table.weight.shape[1], float(table.weight.std())).to(device)
    ids = caption_ids(tokenizer, captions)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    losses = []
    batch = min(cfg.batch_size, len(captions))
    with progress(cfg.steps, f"caption EM (LM decoder): prefix on {len(captions)} captions", "step") as bar:
        for _ in range(cfg.steps):
            rows = torch.randint(len(captions), (batch,), generator=generator).tolist()
            width = max(len(ids[r]) for r in rows)
            tokens = torch.full((batch, width), tokenizer.eos_token_id, dtype=torch.long)
            labels = torch.full((batch, width), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                tokens[i, : len(ids[r])] = torch.tensor(ids[r])
                labels[i, : len(ids[r])] = torch.tensor(ids[r])
            tokens, labels = tokens.to(device), labels.to(device)
            prefix = with_bos(model, tokenizer, head(emb[rows].float().to(device)))
            k = prefix.shape[1]
            # position k-1+j predicts token j; the last caption position predicts nothing
            x = torch.cat([prefix, table(tokens[:, :-1])], dim=1)
            mask = torch.cat([torch.ones(batch, k, dtype=torch.long, device=device),
                              (labels[:, :-1] != -100).long()], dim=1)
            logits = model(inputs_embeds=x, attention_mask=mask).logits[:, k - 1 :]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return head.eval(), losses


@torch.no_grad()
def greedy(model, tokenizer, prefix: torch.Tensor, limits: list[int]) -> list[list[int]]:
    """Greedy token ids after `prefix` [n, k, H], row i up to its first EOS (excluded) or limits[i] + 1 tokens."""
    table = model.get_input_embeddings()
    eos = tokenizer.eos_token_id
    out = model(inputs_embeds=prefix, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(dim=-1)
    steps = [token]
    ended = token == eos
    for _ in range(max(limits)):
        if ended.all():
            break
        out = model(inputs_embeds=table(token[:, None]), past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(dim=-1)
        steps.append(token)
        ended |= token == eos
    rows = torch.stack(steps, dim=1).tolist()
    return [row[: row.index(eos)] if eos in row else row + [None] for row in rows]  # None: never ended


def lm_caption_em(model, tokenizer, train_emb, train_captions, test_emb, test_captions, cfg: ProbeConfig,
                  batch_size: int = 64) -> dict:
    """{em, train_em, losses, decoded: held-out decodings} (sides already filtered: see caption_em.probe_captions)."""
    began = time.monotonic()
    device = next(model.parameters()).device
    head, losses = train_prefix(model, tokenizer, train_emb, train_captions, cfg)

    def em(emb, captions):
        decoded = []
        limits = [len(i) for i in caption_ids(tokenizer, captions)]
        for start in range(0, len(captions), batch_size):
            prefix = with_bos(model, tokenizer, head(emb[start : start + batch_size].float().to(device)))
            decoded += greedy(model, tokenizer, prefix, limits[start : start + batch_size])
        texts = [None if None in d else tokenizer.decode(d, clean_up_tokenization_spaces=False) for d in decoded]
        return sum(t == c for t, c in zip(texts, captions)) / max(1, len(captions)), texts

    test_em, texts = em(test_emb, test_captions)
    n = min(len(train_captions), cfg.train_em_max)
    train_em, _ = em(train_emb[:n], train_captions[:n])
    log.info("caption EM (LM decoder): EM %.3f held-out, %.3f train, %.0f s", test_em, train_em,
             time.monotonic() - began)
    return {"em": test_em, "train_em": train_em, "losses": losses, "decoded": texts}
