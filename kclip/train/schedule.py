"""Learning-rate schedule as a pure function of the step (as open_clip does): nothing to checkpoint, resume-safe."""
import math


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from base_lr/warmup to base_lr over `warmup_steps`, then cosine decay to base_lr*min_lr_ratio."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
