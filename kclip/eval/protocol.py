"""The evaluation settings `kclip eval` offers as options, apart from the probes that use them: those import torch,
and the command line lists and checks its options without it (`kclip eval --help` answers at once)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_K = 10  # neighbours per caption in the teacher kNN overlap (kclip.eval.knn_overlap)
# Without --probe-train, this fraction of --data (by image id / caption hash) is the probes' test side.
PROBE_TEST_FRACTION = 0.3

# Zero-shot prompts (kclip.eval.zeroshot).
DEFAULT_TEMPLATES = (
    "{}",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "an emoji of {}.",
    "a photo of the {}.",
)


EM_CORPORA = ("all", "train", "both")  # which captions the caption autoencoder (stage 1) is trained on


@dataclass
class ProbeConfig:
    """The caption reconstruction probe (kclip.eval.caption_em, kclip.eval.caption_autoencoder).

    Stage 1 (once per caption corpus, cached on disk): a byte autoencoder (bidirectional GRU encoder -> Linear +
    LayerNorm -> GRU decoder) trained on caption text for min(ae_epochs passes, ae_max_steps) steps at ae_lr, with
    Gaussian noise of std ae_noise on the decoder's conditioning. Stage 2 (per encoder): Linear + LayerNorm from the
    frozen embedding into the frozen decoder, initialised by ridge regression onto the autoencoder's codes of the
    training captions, then `steps` steps at `lr`. `corpus`: the captions stage 1 sees (see EM_CORPORA)."""

    steps: int = 150
    batch_size: int = 64
    hidden: int = 256
    layers: int = 1
    lr: float = 3e-3
    max_bytes: int = 128
    seed: int = 0
    ae_epochs: int = 20
    ae_max_steps: int = 2500
    ae_lr: float = 2e-3
    ae_noise: float = 0.1
    corpus: str = "all"
    prefix_tokens: int = 4  # soft tokens fed to a pretrained LM decoder (--em-decoder)
    train_em_max: int = 1000  # training captions decoded for caption_em_train (the first ones, in order)

    def stage1(self) -> dict:
        """What the stage-1 autoencoder depends on (its cache key covers these)."""
        return {k: getattr(self, k) for k in ("batch_size", "hidden", "layers", "max_bytes", "seed", "ae_epochs",
                                              "ae_max_steps", "ae_lr", "ae_noise")}

    def describe(self) -> str:
        return "byte-autoencoder " + " ".join(f"{k}={v}" for k, v in asdict(self).items())
