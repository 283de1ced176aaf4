"""Evaluation harness: zero-shot classification, zero-shot retrieval and linear probe, computed as LAION's
CLIP_benchmark computes them, so model-card numbers can be reproduced and checkpoints compared.

`runner.evaluate(model, EvalConfig(...))` returns the metrics; `report` writes CLIP_benchmark's JSON and the
terminal tables; `datasets` reads the local dataset layouts; `prompts` holds the packaged ImageNet prompts
(torch-free, so the server and `--help` can import it cheaply).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipserve.eval.report import EvalResult
    from clipserve.eval.runner import TASKS, EvalConfig, evaluate

__all__ = ["TASKS", "EvalConfig", "EvalResult", "evaluate"]


def __getattr__(name: str) -> Any:
    # Lazy, like `clipserve.__getattr__`: importing `clipserve.eval.prompts` must not pull in torch.
    if name in ("TASKS", "EvalConfig", "evaluate"):
        from clipserve.eval import runner

        return getattr(runner, name)
    if name == "EvalResult":
        from clipserve.eval.report import EvalResult

        return EvalResult
    raise AttributeError(f"module 'clipserve.eval' has no attribute {name!r}")
