"""Stage 1 of the caption EM probe: a caption autoencoder over UTF-8 bytes, trained on caption text only.

The paper (after Kamath et al. 2023) first fine-tunes a T5 encoder and decoder to reconstruct sentences, then freezes
the decoder and reads other text encoders' embeddings into it (stage 2, kclip.eval.caption_em). Without a pretrained
decoder offline, stage 1 here trains a small one from scratch on the caption corpus, so that the decoder knows the
language of the captions it must reproduce, as T5 knows English:
    z = [last forward state; last backward state] of a bidirectional GRU over the caption's bytes   (width hidden)
    c = LayerNorm(W z + b) (+ N(0, ae_noise^2) while training: a smoother code space for stage 2's linear maps)
    decoder: h_0 = tanh(c) in every layer; input_t = [byte_emb(x_{t-1}); c]; next-byte cross-entropy.
Bytes: any student tokenizer's captions, no vocabulary of its own.

Cached: `$KCLIP_CACHE/caption_ae/<key>.pt` (the kclip cache dir of kclip.gguf_files), where key hashes the
corpus (its distinct captions, sorted), the stage-1 settings (ProbeConfig.stage1) and the torch version, so a study
evaluating many students on one corpus trains it once. Written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from kclip.console import progress
from kclip.eval.protocol import ProbeConfig

log = logging.getLogger(__name__)

BOS, EOS, PAD = 256, 257, -100
VOCAB = 258
FORMAT = 1  # bump when the model or its training changes: old cache entries are then ignored
TRAININGS = {"count": 0}  # autoencoders trained by this process (tests check the cache is used)


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


def fits(caption: str, cfg: ProbeConfig) -> bool:
    return len(caption.encode("utf-8")) <= cfg.max_bytes


class ByteDecoder(nn.Module):
    """The decoder proper: a conditioning vector c (width hidden, after the LayerNorm) -> next-byte logits."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.layers = cfg.layers
        self.byte_emb = nn.Embedding(VOCAB, cfg.hidden)
        self.gru = nn.GRU(2 * cfg.hidden, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.out = nn.Linear(cfg.hidden, VOCAB)

    def forward(self, cond: torch.Tensor, inputs: torch.Tensor, state=None):
        if state is None:
            state = torch.tanh(cond)[None].repeat(self.layers, 1, 1).contiguous()
        x = torch.cat([self.byte_emb(inputs), cond[:, None].expand(-1, inputs.shape[1], -1)], dim=-1)
        hidden, state = self.gru(x, state)
        return self.out(hidden), state


class ByteEncoder(nn.Module):
    """Caption bytes -> z [n, hidden]: the final states of a bidirectional GRU (padding excluded by packing)."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.byte_emb = nn.Embedding(VOCAB, cfg.hidden)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden // 2, batch_first=True, bidirectional=True)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.byte_emb(inputs), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, state = self.gru(packed)  # [2, n, hidden/2]
        return torch.cat([state[0], state[1]], dim=-1)


def adapter(in_dim: int, cfg: ProbeConfig) -> nn.Sequential:
    """The only part stage 2 trains: Linear + LayerNorm into the decoder's conditioning."""
    return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.LayerNorm(cfg.hidden))


class CaptionAutoencoder(nn.Module):
    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.encoder = ByteEncoder(cfg)
        self.bridge = adapter(cfg.hidden - cfg.hidden % 2, cfg)
        self.decoder = ByteDecoder(cfg)

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 512) -> torch.Tensor:
        """z [n, hidden] of each caption: the autoencoder's own text embedding (the probe's upper-bound row)."""
        out = []
        for start in range(0, len(captions), batch_size):
            part = captions[start : start + batch_size]
            inputs, targets = encode_bytes(part)
            # the encoder reads the caption's bytes without BOS: inputs[:, 1:len+1] are the bytes
            lengths = (targets != PAD).sum(dim=1) - 1
            out.append(self.encoder(inputs[:, 1:].clamp(max=VOCAB - 1), lengths.clamp(min=1)))
        return torch.cat(out)

    @torch.no_grad()
    def codes(self, captions: list[str]) -> torch.Tensor:
        """W z + b, the bridge's Linear output before its LayerNorm: stage 2's ridge-regression target."""
        return self.bridge[0](self.encode(captions))


def corpus_key(captions: list[str], cfg: ProbeConfig) -> str:
    h = hashlib.sha256()
    for c in sorted(set(captions)):
        h.update(c.encode("utf-8") + b"\0")
    identity = {"corpus": h.hexdigest(), "cfg": cfg.stage1(), "torch": torch.__version__, "format": FORMAT}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(captions: list[str], cfg: ProbeConfig):
    from kclip.gguf_files import cache_root

    return cache_root() / "caption_ae" / f"{corpus_key(captions, cfg)}.pt"


def ae_steps(num_captions: int, cfg: ProbeConfig) -> int:
    return max(1, min(cfg.ae_max_steps, math.ceil(cfg.ae_epochs * num_captions / cfg.batch_size)))


def train_autoencoder(captions: list[str], cfg: ProbeConfig) -> CaptionAutoencoder:
    """Captions over cfg.max_bytes are left out; duplicates count once; order does not matter."""
    captions = sorted({c for c in captions if fits(c, cfg)})
    if not captions:
        raise ValueError("caption autoencoder: no caption within max_bytes")
    TRAININGS["count"] += 1
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = CaptionAutoencoder(cfg)
        noise = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ae_lr)
    inputs, targets = encode_bytes(captions)
    lengths = (targets != PAD).sum(dim=1)
    steps = ae_steps(len(captions), cfg)
    began = time.monotonic()
    with progress(steps, f"caption EM stage 1: autoencoder on {len(captions)} captions", "step") as bar:
        for step in range(steps):
            rows = torch.randint(len(captions), (cfg.batch_size,), generator=generator)
            width = int(lengths[rows].max())
            z = model.encoder(inputs[rows, 1:width].clamp(max=VOCAB - 1), (lengths[rows] - 1).clamp(min=1))
            cond = model.bridge(z)
            cond = cond + cfg.ae_noise * torch.randn(cond.shape, generator=noise)
            logits, _ = model.decoder(cond, inputs[rows, :width])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets[rows, :width].reshape(-1), ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("caption EM: autoencoder trained on %d captions, %d steps, in %.0f s (final batch loss %.3f)",
             len(captions), steps, time.monotonic() - began, loss.item())
    return model.eval()


def load_or_train(captions: list[str], cfg: ProbeConfig) -> tuple[CaptionAutoencoder, str]:
    """(the autoencoder of this corpus and stage-1 settings, its cache file): trained once, then read back."""
    path = cache_path(captions, cfg)
    model = CaptionAutoencoder(cfg)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), str(path)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged entry (truncated file) is retrained, not fatal
        log.warning("caption EM: cache entry %s unreadable (%s: %s); retraining", path, type(e).__name__, e)
    model = train_autoencoder(captions, cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        os.close(fd)
        try:
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a read-only or full cache costs the next evaluation a retraining, not this one
        log.warning("caption EM: cannot cache the autoencoder in %s (%s)", path, e)
    return model, str(path)
