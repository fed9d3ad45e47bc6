"""Caption reconstruction probe (EM), as the paper runs it after Kamath et al. 2023: how much of a caption can be
read back from its frozen text embedding.

Stage 1 (kclip.eval.caption_autoencoder): a caption autoencoder over bytes, trained once per caption corpus on its
text only, and cached. Stage 2 (here), per text encoder: the autoencoder's decoder is frozen, and only a Linear +
LayerNorm from the frozen embedding e into the decoder's conditioning is trained, on the training captions:
    c = LayerNorm(W standardise(e) + b);   loss = next-byte cross-entropy through the frozen decoder;
    EM = fraction of held-out captions whose greedy decoding equals the caption's bytes.
standardise: per-dimension z-score with the training captions' statistics (an affine map the Linear could learn
itself; done in closed form so that anisotropic embeddings, such as a decoder LM's, train as fast as isotropic ones).
W, b start at the ridge-regression solution onto the autoencoder's codes of the training captions (its bridge's Linear
output), then `steps` Adam steps of the reconstruction loss. Rows: any embedding, the autoencoder's own encoder
(upper bound), the teacher's pooled embedding, a student's text embedding.
Only comparisons under the same ProbeConfig and captions mean something: the decoder is small and knows only the
corpus it was trained on (absolute numbers are not the paper's). Captions longer than `max_bytes` are left out, and
so are held-out captions that also occur among the training captions.
caption_em() runs on one CPU thread: fast on a shared CPU (see single_thread), and its numbers do not depend on the
machine's core count.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from kclip.console import progress
from kclip.eval.caption_autoencoder import (
    EOS,
    PAD,
    VOCAB,
    ByteDecoder,
    CaptionAutoencoder,
    adapter,
    encode_bytes,
    fits,
    load_or_train,
)
from kclip.eval.protocol import ProbeConfig

__all__ = ["ProbeConfig", "caption_em", "probe_captions", "single_thread", "stage2", "exact_match"]
log = logging.getLogger(__name__)
RIDGE = 1e-2  # ridge penalty, relative to the mean eigenvalue of the standardised embeddings' Gram matrix


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


def probe_captions(train_captions: list[str], test_captions: list[str], cfg: ProbeConfig) -> tuple[list[int], list[int]]:
    """(rows of train_captions, rows of test_captions) the probe uses: within max_bytes, and held-out captions that
    are not also training captions."""
    train_rows = [i for i, c in enumerate(train_captions) if fits(c, cfg)]
    seen = {train_captions[i] for i in train_rows}
    test_rows = [i for i, c in enumerate(test_captions) if fits(c, cfg) and c not in seen]
    return train_rows, test_rows


class Standardise(torch.nn.Module):
    def __init__(self, emb: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", emb.mean(dim=0))
        self.register_buffer("std", emb.std(dim=0, correction=0).clamp(min=1e-6 * float(emb.std()) + 1e-12))

    def forward(self, e):
        return (e - self.mean) / self.std


def ridge_init(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    """linear.weight, linear.bias = argmin |x W^T + b - y|^2 + lam |W|^2 (x standardised, so b = mean y)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    lam = RIDGE * float(gram.diagonal().mean()) + 1e-6  # + 1e-6: constant (all-zero) embeddings
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T @ (y - y.mean(dim=0)))
    with torch.no_grad():
        linear.weight.copy_(w.T.float())
        linear.bias.copy_(y.mean(dim=0).float())


def stage2(decoder: ByteDecoder, emb: torch.Tensor, captions: list[str], cfg: ProbeConfig,
           codes: torch.Tensor | None = None, desc: str = "caption EM stage 2") -> torch.nn.Module:
    """The trained Linear + LayerNorm (after standardisation) from `emb` into the frozen `decoder`; `codes`: the
    autoencoder's codes of `captions`, the ridge initialisation's target (random initialisation without)."""
    emb = emb.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = torch.nn.Sequential(Standardise(emb), adapter(emb.shape[1], cfg))
    if codes is not None:
        ridge_init(head[1][0], head[0](emb), codes.float())
    for p in decoder.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    inputs, targets = encode_bytes(captions)
    lengths = (targets != PAD).sum(dim=1)
    with progress(cfg.steps, f"{desc}: Linear+LayerNorm on {len(captions)} captions", "step") as bar:
        for step in range(cfg.steps):
            rows = torch.randint(len(captions), (cfg.batch_size,), generator=generator)
            width = int(lengths[rows].max())
            logits, _ = decoder(head(emb[rows]), inputs[rows, :width])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets[rows, :width].reshape(-1), ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return head.eval()


@torch.no_grad()
def greedy_decode(decoder: ByteDecoder, cond: torch.Tensor, limits: list[int], batch_size: int = 512,
                  desc: str = "caption EM: decoding") -> list[bytes | None]:
    """Greedy decoding from conditioning vectors, row i for at most limits[i] + 1 bytes (its EOS included): a row
    that has not ended by then cannot equal a caption of limits[i] bytes."""
    out = []
    with progress(len(cond), desc, "caption", leave=False) as bar:
        for start in range(0, len(cond), batch_size):
            c, limit = cond[start : start + batch_size], limits[start : start + batch_size]
            token = torch.full((len(c), 1), 256, dtype=torch.long)
            state, steps = None, []
            ended = torch.zeros(len(c), dtype=torch.bool)
            for _ in range(max(limit) + 1):
                logits, state = decoder(c, token, state)
                token = logits[:, -1].argmax(dim=-1, keepdim=True)
                steps.append(token)
                ended |= token[:, 0] == EOS
                if ended.all():  # everything after a row's first EOS is cut off below: more steps change nothing
                    break
            for row in torch.cat(steps, dim=1).tolist():
                body = row[: row.index(EOS)] if EOS in row else None
                out.append(bytes(body) if body is not None and all(b < 256 for b in body) else None)
            bar.update(len(c))
    return out


def exact_match(decoder: ByteDecoder, cond: torch.Tensor, captions: list[str]) -> float:
    encoded = [c.encode("utf-8") for c in captions]
    decoded = greedy_decode(decoder, cond, [len(e) for e in encoded])
    return sum(d == e for d, e in zip(decoded, encoded)) / max(1, len(captions))


def score(autoencoder: CaptionAutoencoder, train_emb, train_captions, test_emb, test_captions, cfg: ProbeConfig,
          desc: str) -> dict:
    """{em, train_em} of one embedding through the frozen decoder of `autoencoder` (sides already filtered)."""
    began = time.monotonic()
    head = stage2(autoencoder.decoder, train_emb, train_captions, cfg, autoencoder.codes(train_captions), desc)
    with torch.no_grad():
        em = exact_match(autoencoder.decoder, head(test_emb.float()), test_captions)
        n = min(len(train_captions), cfg.train_em_max)
        train_em = exact_match(autoencoder.decoder, head(train_emb[:n].float()), train_captions[:n])
    log.info("%s: EM %.3f held-out, %.3f train, %.0f s", desc, em, train_em, time.monotonic() - began)
    return {"em": em, "train_em": train_em}


def caption_em(train_emb: torch.Tensor, train_captions: list[str], test_emb: torch.Tensor, test_captions: list[str],
               cfg: ProbeConfig | None = None, device="cpu", *, corpus: list[str] | None = None,
               others: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, upper_bound: bool = False,
               lm=None) -> dict:
    """{em, train_em, num_train, num_test, autoencoder: cache file, and for each name in `others` (name -> (train
    rows, test rows) of another embedding of the same captions) and "autoencoder" with `upper_bound`: <name>/em,
    <name>/train_em}. Stage 1's corpus: `corpus`, default the training and held-out captions (cfg.corpus "all") or the
    training captions only (cfg.corpus "train"). Runs on the CPU whatever `device` (kept for callers).
    `lm`: (model, tokenizer) of a pretrained causal LM (kclip.eval.lm_decoder.load_lm) replacing stage 1: no
    autoencoder, no upper-bound row, and the LM runs where its weights are."""
    cfg = cfg or ProbeConfig()
    train_rows, test_rows = probe_captions(train_captions, test_captions, cfg)
    train_captions = [train_captions[i] for i in train_rows]
    test_captions = [test_captions[i] for i in test_rows]
    if not train_captions or not test_captions:
        raise ValueError(f"caption probe needs training and held-out captions (got {len(train_captions)} and "
                         f"{len(test_captions)})")
    if corpus is None:
        corpus = train_captions + (test_captions if cfg.corpus == "all" else [])
    rows = {"": (train_emb, test_emb), **(others or {})}
    if lm is not None:
        from kclip.eval.lm_decoder import lm_caption_em

        out = {"num_train": len(train_captions), "num_test": len(test_captions)}
        for name, (tr, te) in rows.items():
            result = lm_caption_em(*lm, tr.cpu()[train_rows], train_captions, te.cpu()[test_rows], test_captions, cfg)
            out.update({(f"{name}/{k}" if name else k): result[k] for k in ("em", "train_em")})
        return out
    with single_thread():
        autoencoder, path = load_or_train(corpus, cfg)
        if upper_bound:
            rows["autoencoder"] = (autoencoder.encode(train_captions), autoencoder.encode(test_captions))
        out = {"num_train": len(train_captions), "num_test": len(test_captions), "autoencoder_file": path}
        for name, (tr, te) in rows.items():
            if name != "autoencoder":  # the autoencoder's rows are of the filtered captions already
                tr, te = tr.cpu()[train_rows], te.cpu()[test_rows]
            result = score(autoencoder, tr, train_captions, te, test_captions, cfg,
                           f"caption EM {name or 'student'}")
            out.update({(f"{name}/{k}" if name else k): v for k, v in result.items()})
    return out

