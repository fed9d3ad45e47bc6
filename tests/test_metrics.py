"""The log window's numbers are what their names say: each loss term is the mean over the steps that had it."""
import pytest
import torch

from kclip.train.metrics import LogWindow
from kclip.train.task import StepResult


def _step(total: float, **terms: float) -> StepResult:
    return StepResult(total=torch.tensor(total), terms={k: torch.tensor(v) for k, v in terms.items()}, finite=True,
                      logit_scale=torch.tensor(1.0), samples=8)


def test_a_term_missing_from_some_steps_is_averaged_over_the_steps_that_had_it():
    window = LogWindow()
    window.add(_step(2.0, contrastive=2.0))
    window.add(_step(2.0, contrastive=2.0))
    window.add(_step(3.5, contrastive=2.0, concept=3.0))  # the first step with soft labels
    window.add(_step(4.5, contrastive=2.0, concept=5.0))
    summary = window.summary()
    assert summary["loss/concept"] == pytest.approx(4.0)  # (3 + 5) / 2, not / 4
    assert summary["loss/contrastive"] == pytest.approx(2.0)
    assert summary["loss/total"] == pytest.approx(3.0)
    window.add(_step(1.0, contrastive=1.0))  # a new window: its sums and counts start again
    summary = window.summary()
    assert "loss/concept" not in summary and summary["loss/contrastive"] == summary["loss/total"] == 1.0
