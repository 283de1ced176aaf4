"""CPU fast-path helpers shared by `Model`, the server's batching and bench/encode.py.

* Thread plans: decode workers and inference threads that together use the cores once, no more.
* Length-sorted text batches: prompts of similar length share a batch, so each batch is trimmed to a short
  longest row (the towers' trim is exact: causal mask / key mask).
* uint8 -> float normalisation on the model side, in torchvision's arithmetic, from the decode buffer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads decode images and how many run the model, when both run at the same time.

    OpenMP and ONNX Runtime worker threads spin and wait at barriers: if decode threads take a core from one
    of them, every GEMM waits for the preempted thread. So the two pools split the cores instead of sharing
    them: `inference_threads = cores - decode_workers` (at least 1). A decode worker costs the model 1/cores of
    its threads and hides the decode share of the work (~10 ms per 1024x768 JPEG against ~80 ms of ViT-B/32
    fp32 per image on 2 cores, ~12%). Below 8 cores that trade loses: measured on 2 cores (bench/encode.py,
    e2e32), decoding inline gave 11.4 images/s and one overlapped worker 6.9. So: no decode worker below 8
    cores, then one per 8 cores.
    """

    inference_threads: int
    decode_workers: int

    @classmethod
    def for_cores(cls, cores: int | None = None, decode_workers: int | None = None) -> ThreadPlan:
        cores = cores or available_cores()
        workers = cores // 8 if decode_workers is None else decode_workers
        if workers < 0:
            raise ValueError(f"decode_workers must be >= 0, got {workers}")
        return cls(inference_threads=max(1, cores - workers), decode_workers=workers)

    @classmethod
    def for_device(cls, device_type: str, cores: int | None = None) -> ThreadPlan:
        """`for_cores` for a model on the CPU; with the model on a GPU the cores have nothing to do but
        decode, so all but one (which feeds the GPU) decode."""
        if device_type == "cpu":
            return cls.for_cores(cores)
        cores = cores or available_cores()
        return cls(inference_threads=1, decode_workers=max(1, cores - 1))

    def apply(self) -> None:
        """Set torch's intra-op threads (process-wide); ONNX sessions take `inference_threads` at creation."""
        torch.set_num_threads(self.inference_threads)


def length_sorted_chunks(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices, longest first, cut into chunks of `batch_size`: similar lengths share a chunk.

    Longest first so that the first (slowest) chunk shows the worst-case memory at once.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    return list(order.split(batch_size))


def encode_length_sorted(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    batch_size: int,
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run `encode` on length-sorted chunks of `tokens` and return its rows in the input order."""
    out: torch.Tensor | None = None
    for rows in length_sorted_chunks(lengths, batch_size):
        result = encode(tokens[rows])
        if out is None:
            out = result.new_empty((tokens.shape[0], *result.shape[1:]))
        out[rows] = result
    assert out is not None, "encode_length_sorted needs at least one row"
    return out


def normalise_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, 3] (the decode buffer) -> normalised float32 [N, 3, H, W] (channels-last strides).

    One cast pass, then torchvision's `div(255)`, `sub_(mean)`, `div_(std)` in place, so the values are
    bit-identical to the exact preprocessing path; the NHWC -> NCHW change is a view, not a copy (convolution
    takes channels-last input as it is).
    """
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    shape = (1, 3, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(shape)
    return x.div_(255).sub_(mean_t).div_(std_t)
