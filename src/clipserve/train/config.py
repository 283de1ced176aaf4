"""`TrainConfig`: every knob of a training run, validated once where it enters (CLI or Python)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

TOWERS = ("image", "text")
PRECISIONS = ("fp32", "bf16")
# Fields that may change between a run and its resumption without changing the numbers it produces.
RESUME_FREE_FIELDS = frozenset(
    {"output", "resume", "max_steps", "progress", "workers", "log_every", "save_every", "eval_every"}
)
MAX_LOGIT_SCALE = math.log(100.0)


class TrainConfigError(ValueError):
    """A training option that cannot work; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    output: Path
    epochs: int = 1
    batch_size: int = 64  # per rank and micro-batch; the global batch is batch_size * world size
    accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    wd: float = 0.2
    warmup: int = 100  # optimizer steps of linear warm-up before the cosine decay
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = None  # max global grad norm
    precision: str = "fp32"  # autocast dtype: fp32 or bf16 (weights and optimizer state stay fp32)
    freeze: tuple[str, ...] = ()  # towers whose parameters are not trained
    lock_image: bool = False  # LiT: image tower frozen except its last `lock_image_unlocked_groups` groups
    lock_image_unlocked_groups: int = 0
    augment_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop area range (open_clip's default)
    seed: int = 0
    workers: int = 0  # DataLoader worker processes per rank
    device: str = "cpu"
    eval_every: int = 1  # epochs between zero-shot evaluations (0: only at the end)
    log_every: int = 10  # optimizer steps between log records
    save_every: int = 0  # optimizer steps between checkpoints (0: at the end of each epoch only)
    max_steps: int | None = None  # stop (and save) after this many optimizer steps; the schedule is unchanged
    resume: bool = False  # continue from the training state in `output`
    progress: bool = True  # tqdm progress bar on the terminal

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "augment_scale", tuple(self.augment_scale))
        positive = ("epochs", "batch_size", "accum_steps", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "workers", "eval_every", "save_every", "lock_image_unlocked_groups"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be positive, got {self.lr}")
        if self.wd < 0:
            raise TrainConfigError(f"wd must not be negative, got {self.wd}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise TrainConfigError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        unknown = [t for t in self.freeze if t not in TOWERS]
        if unknown:
            raise TrainConfigError(f"freeze: unknown tower {unknown[0]!r}; choose from {', '.join(TOWERS)}")
        if set(self.freeze) == set(TOWERS) or (self.lock_image and "text" in self.freeze):
            raise TrainConfigError("every tower is frozen: nothing left to train")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise TrainConfigError("lock_image_unlocked_groups needs lock_image")
        low, high = self.augment_scale
        if not 0 < low <= high <= 1:
            raise TrainConfigError(f"augment_scale must satisfy 0 < low <= high <= 1, got {self.augment_scale}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainConfigError(f"max_steps must be at least 1, got {self.max_steps}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that determine the numbers of a run (what a resumed run must share with the original)."""
        data = asdict(self)
        return {f.name: _jsonable(data[f.name]) for f in fields(self) if f.name not in RESUME_FREE_FIELDS}

    def as_json(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in asdict(self).items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
