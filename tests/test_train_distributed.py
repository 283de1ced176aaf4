"""Two gloo ranks equal one rank with the combined batch; a stopped and resumed run equals an uninterrupted one."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from clipserve.io.checkpoints import read_safetensors
from clipserve.io.tokenizers import CLIPTokenizer
from clipserve.train import digits
from clipserve.train.config import TrainConfig
from clipserve.train.distributed import DistContext, init_distributed, mean_across_ranks
from clipserve.train.trainer import (
    TRAINING_STATE,
    build_module,
    contrastive_backward,
    train,
)

BATCH = 8  # global; each of the two ranks holds 4


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = CLIPTokenizer()([f"a handwritten {i}" for i in range(BATCH)])
    return pixels, tokens


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    module = build_module(digits.starting_point(), seed=0)
    model = torch.nn.parallel.DistributedDataParallel(module)
    pixels, tokens = _batch()
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    loss = contrastive_backward(model, pixels[half], tokens[half], ctx)
    global_loss = mean_across_ranks(loss, ctx)
    torch.save({"loss": global_loss, "grads": _gradients(module)}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_rank_with_the_combined_batch(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)

    module = build_module(digits.starting_point(), seed=0)
    loss = contrastive_backward(module, *_batch(), DistContext())
    reference = _gradients(module)

    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["loss"], loss, rtol=0, atol=1e-5)
        assert result["grads"].keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
    # The loss is not trivially equal: with 4 samples per rank a local-only loss would differ.
    local_only = build_module(digits.starting_point(), seed=0)
    pixels, tokens = _batch()
    assert abs(float(contrastive_backward(local_only, pixels[:4], tokens[:4], DistContext())) - float(loss)) > 1e-3


def _resume_config(output: Path, **changes: object) -> TrainConfig:
    # 96 digits, micro-batches of 8 accumulated in pairs: 6 optimizer steps per epoch, 2 epochs.
    return TrainConfig(
        output=output, epochs=2, batch_size=8, accum_steps=2, lr=1e-3, warmup=3, seed=3, progress=False,
        grad_clip=1.0, log_every=1, **changes,
    )


def test_resume_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    records = digits.load_split("train").records()[:96]
    start = digits.starting_point()

    straight = train(_resume_config(tmp_path / "straight"), start, records)
    stopped = train(_resume_config(tmp_path / "resumed", max_steps=4), start, records)  # mid-epoch 0
    assert (stopped.step, stopped.finished) == (4, False)
    assert (tmp_path / "resumed" / TRAINING_STATE).is_file()
    resumed = train(_resume_config(tmp_path / "resumed", resume=True), start, records)
    assert (straight.step, resumed.step, resumed.finished) == (12, 12, True)

    a = read_safetensors(tmp_path / "straight" / "open_clip_model.safetensors")
    b = read_safetensors(tmp_path / "resumed" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = build_module(start, seed=3).state_dict()
    assert not torch.equal(a["visual.proj"], initial["visual.proj"])  # training did move the weights
