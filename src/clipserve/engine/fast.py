"""CPU fast-path helpers shared by `Model`, the server's batching and bench/encode.py.

* Thread plans: how many threads decode, and whether while the model runs (GPU) or between batches (CPU).
* Length-sorted text batches: prompts of similar length share a batch, so each batch is trimmed to a short
  longest row (the towers' trim is exact: causal mask / key mask).
* uint8 -> float normalisation on the model side, in torchvision's arithmetic, from the decode buffer.
* glibc's allocator told to keep freed memory for the next batch (`retain_freed_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
RETAINED_MIB = 256  # freed memory glibc keeps at the top of its heaps instead of returning it to the OS
MMAP_MIB = 32  # allocations from this size up still get their own mapping, returned to the OS when freed


@functools.cache
def retain_freed_memory() -> bool:
    """Have glibc keep up to `RETAINED_MIB` of freed memory for reuse (process-wide, once; False where the C
    library is not glibc).

    A CPU forward pass allocates and frees tens of MiB of activations per block. By default glibc returns the
    top of its heap to the OS whenever more than twice its (dynamic) mmap threshold is free there, so the next
    block's activations fault every page in again. ViT-B/32, batch 32, on a 2-core AVX-512 EPYC
    (`bench/encode.py --models ViT-B-32 --workloads image32`, with and without `--glibc-default`, two runs):
    int8 73.9 against 43.9 images/s, fp32 37.1 against 27.9, int8 with `compile=True` (fewer, fused
    allocations) 88.1 against 68.7. Peak RSS unchanged, since the memory was in use a moment before. jemalloc
    and tcmalloc, which CPU inference guides preload for this, keep freed memory the same way.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_MIB << 20) == 1  # also fixes the threshold (no dynamic one)
        done = libc.mallopt(_M_TRIM_THRESHOLD, RETAINED_MIB << 20) == 1 and done
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc keeps up to %d MiB of freed memory for reuse", RETAINED_MIB)
    return done


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    """How images are decoded around the model: on how many threads, and whether during inference.

    With the model on the CPU, in bursts (`overlap=False`): all cores decode a batch, then all cores run the
    model on it. Decoding during inference would take cores from the model's OpenMP threads, which spin and
    wait at barriers, so one preempted thread stalls every GEMM (measured on 2 cores, bench/encode.py e2e32:
    one decode worker overlapped with inference gave 6.9 images/s against 11.4 decoding inline); decoding on
    the calling thread alone leaves the other cores idle meanwhile. Pillow's decoder and resize and torch's
    resize release the GIL, so threads are enough.
    With the model on a GPU the cores have nothing else to do: all but one (which feeds the GPU) decode the
    next batch while the GPU runs the current one (`overlap=True`).
    """

    decode_workers: int
    overlap: bool

    @classmethod
    def for_device(cls, device_type: str, cores: int | None = None) -> ThreadPlan:
        cores = cores or available_cores()
        if device_type == "cpu":
            return cls(decode_workers=cores, overlap=False)
        return cls(decode_workers=max(1, cores - 1), overlap=True)


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
