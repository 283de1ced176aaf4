"""Contrastive training on the engine: from scratch (an architecture) or fine-tuning (anything `load` reads).

One loop for one process and for N processes under torchrun: DDP averages gradients, the loss gathers
features with gradients (`clipserve.train.loss`), and the data sampler gives every rank disjoint batches.

The output directory is a servable checkpoint at all times (`open_clip_config.json` +
`open_clip_model.safetensors`, written atomically), plus:
- `training_state.pt`: weights, optimizer, step, RNG states (python, numpy, torch) and the config fingerprint;
  the data position follows from the step. Resuming from it is bit-identical to not stopping.
- `train_config.json` (the run's options) and `log.jsonl` (one record per log interval and per evaluation).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clipserve import registry
from clipserve.config import PreprocessConfig, model_config_from_open_clip, read_open_clip_config
from clipserve.engine.loading import ResolvedCheckpoint, build_tokenizer, resolve
from clipserve.engine.model import Model
from clipserve.io.checkpoints import atomic_write, check_keys, write_directory
from clipserve.io.tokenizers import Tokenizer
from clipserve.models.clip import CLIP
from clipserve.train.config import MAX_LOGIT_SCALE, TrainConfig, TrainConfigError
from clipserve.train.data import PairDataset, Record, ShardedBatchSampler, TrainTransform, collate
from clipserve.train.distributed import DistContext, barrier, init_distributed, mean_across_ranks
from clipserve.train.loss import contrastive_loss

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
TRAIN_CONFIG = "train_config.json"
LOG_FILE = "log.jsonl"

Evaluator = Callable[[Model], dict[str, float]]


@dataclass
class TrainResult:
    output: Path
    step: int  # optimizer steps taken so far (over all sessions of a resumed run)
    finished: bool  # False when the run stopped at `max_steps` before its last epoch
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's


# ----------------------------------------------------------------------------------------------------------
# Starting point


def starting_point(model: str | None = None, arch: str | None = None, checkpoint: str | None = None) -> ResolvedCheckpoint:
    """What training starts from: a loadable model (fine-tuning) or an architecture (empty state: from scratch).

    `arch` is a registry name or a JSON file holding an open_clip `model_cfg` (or a whole open_clip_config.json).
    """
    if (model is None) == (arch is None):
        raise TrainConfigError("pass exactly one of a model to fine-tune or an architecture to train from scratch")
    if model is not None:
        return resolve(model, checkpoint)
    assert arch is not None
    path = Path(arch)
    if arch in registry.ARCHITECTURES:
        model_cfg = registry.architecture(arch)
        pre_cfg = PreprocessConfig(size=model_cfg.image_size)
    elif path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "model_cfg" in data:
            model_cfg, pre_cfg = read_open_clip_config(path)
        else:
            model_cfg = model_config_from_open_clip(data, str(path))
            pre_cfg = PreprocessConfig(size=model_cfg.image_size)
    else:
        raise registry.UnknownModelError(
            f"unknown architecture {arch!r}: use one of {', '.join(sorted(registry.ARCHITECTURES))} "
            "or a JSON file with an open_clip model_cfg"
        )
    if model_cfg.text_kind != "clip":
        raise TrainConfigError("training an XLM-RoBERTa text tower from scratch needs its tokenizer: fine-tune instead")
    return ResolvedCheckpoint(
        name=path.stem if path.suffix == ".json" else arch,
        architecture=arch,
        source=arch,
        model_cfg=model_cfg,
        preprocess_cfg=pre_cfg,
        state={},
    )


def build_module(start: ResolvedCheckpoint, seed: int) -> CLIP:
    """A float32 CLIP with the starting point's weights, or open_clip's random init when it has none."""
    module = CLIP(start.model_cfg)
    if not start.state:
        return module.init_weights(seed)
    check_keys(module.state_dict(), start.state, start.source)
    module.load_state_dict({k: v.float() for k, v in start.state.items()}, strict=True)
    return module


def _image_tower_groups(module: CLIP) -> list[list[nn.Parameter]]:
    """open_clip's `lock_image_tower` groups: stem, one per block, last block + ln_post, projection."""
    visual = module.visual
    blocks = list(visual.transformer.resblocks)
    stem = [visual.conv1.weight, visual.class_embedding, visual.positional_embedding, *visual.ln_pre.parameters()]
    groups = [stem, *(list(b.parameters()) for b in blocks[:-1])]
    groups.append([*blocks[-1].parameters(), *visual.ln_post.parameters()])
    groups.append([visual.proj])
    return groups


def freeze_towers(module: CLIP, cfg: TrainConfig) -> None:
    """Turn off gradients of frozen towers (they leave the optimizer and DDP's reduction)."""
    if "image" in cfg.freeze:
        module.visual.requires_grad_(False)
    if "text" in cfg.freeze:
        module.text.requires_grad_(False)
    if cfg.lock_image:
        module.visual.requires_grad_(False)
        groups = _image_tower_groups(module)
        for group in groups[len(groups) - cfg.lock_image_unlocked_groups :] if cfg.lock_image_unlocked_groups else []:
            for p in group:
                p.requires_grad_(True)


def _no_weight_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: gains, biases and the temperature are not decayed.
    return p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(module: CLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not _no_weight_decay(n, p)], "weight_decay": cfg.wd},
    ]
    # fused: one kernel over all parameters. The per-tensor default on CPU spent half of a digits training step
    # in AdamW (the 49408-row token embedding dominates).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (open_clip's `cosine_lr`)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def contrastive_backward(
    model: nn.Module,
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    ctx: DistContext,
    precision: str = "fp32",
    loss_divisor: int = 1,
) -> torch.Tensor:
    """Forward one micro-batch, backpropagate its (rank-local) loss / loss_divisor; return the loss."""
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        image_features, text_features, logit_scale = model(pixels, tokens)
    loss = contrastive_loss(image_features.float(), text_features.float(), logit_scale.float(), ctx)
    (loss / loss_divisor).backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------------------------
# Training state


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output: Path, module: CLIP, optimizer: torch.optim.Optimizer, step: int, start: ResolvedCheckpoint, cfg: TrainConfig
) -> None:
    """Training state first, then the servable checkpoint; each file is replaced atomically."""
    state = {
        "step": step,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "config": cfg.fingerprint(),
    }
    atomic_write(output / TRAINING_STATE, lambda tmp: torch.save(state, tmp))
    write_directory(output, module.state_dict(), start.model_cfg, start.preprocess_cfg)


def load_training_state(output: Path, cfg: TrainConfig) -> dict[str, Any]:
    path = output / TRAINING_STATE
    if not path.is_file():
        raise TrainConfigError(f"cannot resume: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    changed = sorted(k for k in set(saved) | set(cfg.fingerprint()) if saved.get(k) != cfg.fingerprint().get(k))
    if changed:
        raise TrainConfigError(
            f"cannot resume {output}: options differ from the original run ({', '.join(changed)}); "
            "an exact resume needs the same ones"
        )
    return state


# ----------------------------------------------------------------------------------------------------------
# The loop


class _Logger:
    """Rank 0's JSONL log and progress bar."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, total: int, initial: int) -> None:
        self.enabled = ctx.is_main
        self.file = open(cfg.output / LOG_FILE, "a", encoding="utf-8") if self.enabled else None
        self.bar = tqdm(total=total, initial=initial, disable=not (cfg.progress and self.enabled), unit="step",
                        dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _evaluate(
    evaluator: Evaluator, module: CLIP, tokenizer: Tokenizer, start: ResolvedCheckpoint, device: str
) -> dict[str, float]:
    # A fresh Model each time: its label cache must not outlive the weights it was computed with.
    model = Model(module, tokenizer, start.preprocess_cfg, name=start.name, architecture=start.architecture,
                  source=start.source, device=device)
    try:
        return evaluator(model)
    finally:
        module.train()


def train(
    cfg: TrainConfig,
    start: ResolvedCheckpoint,
    records: Sequence[Record],
    evaluator: Evaluator | None = None,
) -> TrainResult:
    """Train contrastively on image-caption `records`; write checkpoints to `cfg.output`.

    `evaluator` (e.g. a zero-shot benchmark) gets a `Model` view of the weights every `cfg.eval_every` epochs
    and at the end of the run, on rank 0; its metrics are logged.
    """
    device = cfg.device
    ctx = init_distributed(device)
    if device.startswith("cuda") and ctx.enabled:
        device = f"cuda:{ctx.local_rank}"
    output = cfg.output
    if ctx.is_main:
        if (output / TRAINING_STATE).exists() and not cfg.resume:
            raise TrainConfigError(f"{output} already holds a training run: pass --resume, or choose another output")
        output.mkdir(parents=True, exist_ok=True)
        (output / TRAIN_CONFIG).write_text(json.dumps(cfg.as_json(), indent=2) + "\n", encoding="utf-8")
        if start.tokenizer_file is not None:
            shutil.copyfile(start.tokenizer_file, output / "tokenizer.json")

    global_batch = cfg.batch_size * ctx.world_size
    micro_per_epoch = len(records) // global_batch
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise TrainConfigError(
            f"{len(records)} samples do not fill one optimizer step of {global_batch * cfg.accum_steps} "
            f"(batch {cfg.batch_size} x {ctx.world_size} ranks x {cfg.accum_steps} accumulation steps)"
        )
    total_steps = steps_per_epoch * cfg.epochs

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    module = build_module(start, cfg.seed)
    freeze_towers(module, cfg)
    optimizer = build_optimizer(module, cfg)
    step = 0
    if cfg.resume:
        state = load_training_state(output, cfg)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        step = state["step"]
    module.to(device).train()
    for group_state in optimizer.state.values():  # after a resume, the moments follow the weights' device
        for key, value in group_state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                group_state[key] = value.to(device)
    model: nn.Module = module
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[ctx.local_rank] if device.startswith("cuda") else None
        )
    trainable = [p for p in module.parameters() if p.requires_grad]
    tokenizer = build_tokenizer(start)
    dataset = PairDataset(records, TrainTransform(start.preprocess_cfg, scale=cfg.augment_scale), cfg.seed)
    logger = _Logger(cfg, ctx, total_steps, step)
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps is not None else total_steps
    metrics: dict[str, float] = {}
    if ctx.is_main:
        log.info("training %s on %d samples: %d steps of %d samples (%d epochs), %d ranks",
                 start.name, len(records), total_steps, global_batch * cfg.accum_steps, cfg.epochs, ctx.world_size)

    window_loss, window_micro, window_start = 0.0, 0, time.perf_counter()
    try:
        while step < stop_at:
            epoch = step // steps_per_epoch
            first_micro = (step % steps_per_epoch) * cfg.accum_steps
            sampler = ShardedBatchSampler(
                len(records), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, epoch,
                start=first_micro, stop=steps_per_epoch * cfg.accum_steps,
            )
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate
            )
            for micro, (pixels, texts) in enumerate(loader, start=first_micro):
                last_micro = (micro + 1) % cfg.accum_steps == 0
                sync = nullcontext() if last_micro or not ctx.enabled else model.no_sync()
                with sync:
                    loss = contrastive_backward(
                        model, pixels.to(device), tokenizer(texts).to(device), ctx, cfg.precision, cfg.accum_steps
                    )
                window_loss += float(loss)
                window_micro += 1
                if not last_micro:
                    continue
                lr = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                step += 1
                logger.bar.update(1)
                if step % cfg.log_every == 0 or step == stop_at:
                    mean_loss = float(mean_across_ranks(torch.tensor(window_loss / window_micro), ctx))
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                        "logit_scale": float(module.logit_scale.detach().exp()),
                        "samples_per_s": window_micro * global_batch / elapsed,
                    }
                    logger.write(record)
                    logger.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", scale=f"{record['logit_scale']:.1f}")
                    window_loss, window_micro, window_start = 0.0, 0, time.perf_counter()
                epoch_done = step % steps_per_epoch == 0
                if (cfg.save_every and step % cfg.save_every == 0) or epoch_done or step == stop_at:
                    if ctx.is_main:
                        save_checkpoint(output, module, optimizer, step, start, cfg)
                    barrier(ctx)
                if step == stop_at:
                    break
            finished_epoch = step % steps_per_epoch == 0
            last_epoch = step == total_steps
            due = cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0
            if evaluator is not None and finished_epoch and (due or last_epoch):
                if ctx.is_main:
                    metrics = _evaluate(evaluator, module, tokenizer, start, device)
                    logger.write({"step": step, "epoch": epoch, "eval": metrics})
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                barrier(ctx)
    finally:
        logger.close()
    return TrainResult(output=output, step=step, finished=step == total_steps, metrics=metrics)
