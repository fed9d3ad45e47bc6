"""Caption reconstruction probe: how much of a caption can be read back from its frozen text embedding.

In the spirit of the exact-match (EM) metric of Kamath et al. 2023 ("Text encoders bottleneck compositionality"),
which the Knowledge-CLIP paper reports on CC3M. Their protocol: frozen text encoder -> trained linear map + LayerNorm
-> frozen pretrained T5 decoder; EM = fraction of held-out captions the decoder reproduces exactly.
Ours: frozen student text embedding e -> trained Linear + LayerNorm -> a small GRU decoder over UTF-8 bytes, trained
from scratch (no pretrained decoder is available offline) for a fixed budget with a fixed seed:
    c = LayerNorm(W e + b);   h_0 = tanh(c) in every layer;   input_t = [byte_emb(x_{t-1}); c]
    loss = cross-entropy of the next byte (teacher forcing), EM = greedy decode == caption bytes.
Only comparisons between text encoders under the same ProbeConfig and captions mean something: the absolute numbers
are far below the paper's (no T5 prior over language, smaller budget). Captions longer than `max_bytes` are left out.
caption_em() runs on one CPU thread: fast on a shared CPU (see single_thread), and its numbers do not depend on the
machine's core count (the thread count changes float sums in the last bits, which 1000 training steps amplify into a
few captions more or less decoded exactly).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kclip.console import progress
from kclip.eval.protocol import ProbeConfig

BOS, EOS, PAD = 256, 257, -100
VOCAB = 258


class CaptionDecoder(nn.Module):
    def __init__(self, embed_dim: int, cfg: ProbeConfig):
        super().__init__()
        self.layers = cfg.layers
        self.adapter = nn.Sequential(nn.Linear(embed_dim, cfg.hidden), nn.LayerNorm(cfg.hidden))
        self.byte_emb = nn.Embedding(VOCAB, cfg.hidden)
        self.gru = nn.GRU(2 * cfg.hidden, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.out = nn.Linear(cfg.hidden, VOCAB)

    def forward(self, emb: torch.Tensor, inputs: torch.Tensor, state=None):
        cond = self.adapter(emb)
        if state is None:
            state = torch.tanh(cond)[None].repeat(self.layers, 1, 1).contiguous()
        x = torch.cat([self.byte_emb(inputs), cond[:, None].expand(-1, inputs.shape[1], -1)], dim=-1)
        hidden, state = self.gru(x, state)
        return self.out(hidden), state


@contextmanager
def single_thread():
    """One torch CPU thread inside the block. A decoder training step is hundreds of small matrix products (one per
    byte and layer, forward and backward), and threads synchronise at each: on 2 busy cores a step took 8.6 s with 2
    threads and 0.49 s with 1. An evaluation often shares its CPU with other jobs; with one thread nothing waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_bytes(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs BOS+bytes, targets bytes+EOS), padded with PAD (ignored by the loss; inputs pad with EOS)."""
    data = [list(c.encode("utf-8")) for c in captions]
    width = max(len(d) for d in data) + 1
    inputs = torch.full((len(data), width), EOS, dtype=torch.long)
    targets = torch.full((len(data), width), PAD, dtype=torch.long)
    for i, d in enumerate(data):
        inputs[i, : len(d) + 1] = torch.tensor([BOS, *d])
        targets[i, : len(d) + 1] = torch.tensor([*d, EOS])
    return inputs, targets


def train_decoder(emb: torch.Tensor, captions: list[str], cfg: ProbeConfig, device="cpu") -> CaptionDecoder:
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        decoder = CaptionDecoder(emb.shape[1], cfg).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    inputs, targets = encode_bytes(captions)
    with progress(cfg.steps, "caption EM: training the decoder", "step") as bar:
        for _ in range(cfg.steps):
            rows = torch.randint(len(captions), (cfg.batch_size,), generator=generator)
            width = int((targets[rows] != PAD).sum(dim=1).max())
            logits, _ = decoder(emb[rows].to(device), inputs[rows, :width].to(device))
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets[rows, :width].reshape(-1).to(device),
                                   ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
            opt.step()
            bar.update()
    return decoder.eval()


@torch.no_grad()
def greedy_decode(decoder: CaptionDecoder, emb: torch.Tensor, max_bytes: int, batch_size: int = 512) -> list[bytes | None]:
    device = next(decoder.parameters()).device
    out = []
    with progress(len(emb), "caption EM: decoding", "caption") as bar:
        for start in range(0, len(emb), batch_size):
            e = emb[start : start + batch_size].to(device)
            token = torch.full((len(e), 1), BOS, dtype=torch.long, device=device)
            state, steps = None, []
            ended = torch.zeros(len(e), dtype=torch.bool, device=device)
            for _ in range(max_bytes + 1):
                logits, state = decoder(e, token, state)
                token = logits[:, -1].argmax(dim=-1, keepdim=True)
                steps.append(token)
                ended |= token[:, 0] == EOS
                if ended.all():  # everything after a row's first EOS is cut off below: more steps change nothing
                    break
            for row in torch.cat(steps, dim=1).tolist():
                body = row[: row.index(EOS)] if EOS in row else row  # no EOS: longer than any kept caption
                out.append(bytes(body) if all(b < 256 for b in body) else None)
            bar.update(len(e))
    return out


def exact_match(decoder: CaptionDecoder, emb: torch.Tensor, captions: list[str], max_bytes: int) -> float:
    decoded = greedy_decode(decoder, emb, max_bytes)
    return sum(d == c.encode("utf-8") for d, c in zip(decoded, captions)) / max(1, len(captions))


def caption_em(train_emb: torch.Tensor, train_captions: list[str], test_emb: torch.Tensor, test_captions: list[str],
               cfg: ProbeConfig | None = None, device="cpu") -> dict:
    """{em, train_em, num_train, num_test}: captions longer than cfg.max_bytes and test captions also present in
    the training captions are left out."""
    cfg = cfg or ProbeConfig()
    def short(emb, captions):
        rows = [i for i, c in enumerate(captions) if len(c.encode("utf-8")) <= cfg.max_bytes]
        return emb[rows], [captions[i] for i in rows]

    train_emb, train_captions = short(train_emb, train_captions)
    seen = set(train_captions)
    test_rows = [i for i, c in enumerate(test_captions) if c not in seen]
    test_emb, test_captions = short(test_emb[test_rows], [test_captions[i] for i in test_rows])
    if not train_captions or not test_captions:
        raise ValueError(f"caption probe needs training and held-out captions (got {len(train_captions)} and "
                         f"{len(test_captions)})")
    with single_thread():
        decoder = train_decoder(train_emb, train_captions, cfg, device)
        em = exact_match(decoder, test_emb, test_captions, cfg.max_bytes)
        train_em = exact_match(decoder, train_emb, train_captions, cfg.max_bytes)
    return {"em": em, "train_em": train_em, "num_train": len(train_captions), "num_test": len(test_captions)}
