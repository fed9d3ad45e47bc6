"""Two tiny trained runs shared by the evaluation, export and report tests, trained in-process once per session:
`kc` (teacher, distillation, concept bank re-fitted every step) and `plain` (contrastive only), on 24 shapes."""
from __future__ import annotations

from pathlib import Path

from shapes import make_shapes_mds

from kclip.eval.caption_em import single_thread

_RUNS: dict[str, Path] = {}

COMMON = ["train.steps=4", "concepts.warmup_steps=2", "concepts.recompute_every=1", "log.every=1", "eval.every=2",
          "eval.batch_size=8", "log.tensorboard=false", "checkpoint.every=2", "dist.timeout_s=60"]
PLAIN = ["loss.distill_weight=0", "loss.concept_weight=0"]


def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """{"kc": run folder, "plain": run folder, "data": MDS folder (labels color, shape)}."""
    if not _RUNS:
        from kclip.config import load_config
        from kclip.train.loop import train

        root = tmp_path_factory.mktemp("evalruns")
        data = make_shapes_mds(root / "shapes", n=24)
        for name, extra in (("kc", []), ("plain", PLAIN)):
            cfg = load_config("smoke", [*COMMON, *extra, f"data.train={data}", f"data.val={data}"])
            with single_thread():
                train(cfg, root / name)
        _RUNS.update(kc=root / "kc", plain=root / "plain", data=data)
    return _RUNS
