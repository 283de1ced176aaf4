"""Image decoding on a worker pool, between or during inference (`ThreadPlan`).

`DecodePool.batches` decodes each batch on the pool, either when the caller asks for it (CPU: the model then
has the cores to itself) or ahead, batch i+1 while the caller runs the model on batch i (GPU). Decoding
(Pillow's JPEG decoder and resize, torch's resize) releases the GIL, so threads are enough. Each worker writes its image's
resized, cropped RGB pixels straight into its row of one preallocated uint8 [N, S, S, 3] batch buffer; the
model side turns that buffer into normalised floats in one pass (`fast.normalise_uint8`).

`fast_decode=True` trades exactness for speed in two steps, neither bit-exact (the cosine to the exact path
is reported by bench/encode.py and asserted in tests/test_fast.py):
* JPEGs decode with `open_image(draft_size=S)`: a DCT-domain downscale by 1/2..1/8 before the resize;
* the resize is torch's antialiased one (`Preprocessor.resize_crop`) instead of Pillow's: on CPU its uint8
  kernel, in the decode worker; with `resize_device` set (the model's GPU), on that device, so the CPU only
  decodes and each image crosses to the device at its decoded size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from clipserve.io.images import ImageInput, ImageLimits, Preprocessor, open_image

T = TypeVar("T")


class DecodePool:
    """Decode and preprocess images into uint8 batches on `workers` threads (0: in the calling thread)."""

    def __init__(
        self,
        preprocessor: Preprocessor,
        workers: int = 1,
        *,
        fast_decode: bool = False,
        limits: ImageLimits | None = None,
        resize_device: torch.device | None = None,
        prefetch: bool = True,
    ) -> None:
        if resize_device is not None and not fast_decode:
            raise ValueError("resize_device needs fast_decode=True: the exact resize is Pillow's, on the CPU")
        self.preprocessor = preprocessor
        self.size = preprocessor.size
        self.fast_decode = fast_decode
        self.limits = limits or ImageLimits()
        self.workers = workers
        self.resize_device = resize_device
        self.prefetch = prefetch
        self._executor = (
            ThreadPoolExecutor(workers, thread_name_prefix="clipserve-decode") if workers else None
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decode_into(self, out: np.ndarray, source: ImageInput) -> None:
        out[...] = self.preprocessor.decode(source, self.limits, fast=self.fast_decode).numpy()

    def _decode_rgb(self, source: ImageInput) -> torch.Tensor:
        return self.preprocessor.rgb_tensor(open_image(source, self.limits, draft_size=self.size))

    def _run(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._executor is not None:
            return self._executor.submit(fn, *args)
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def _submit(self, images: Sequence[ImageInput]) -> _PendingBatch:
        """Start decoding `images` on the pool."""
        if self.resize_device is not None:
            device = self.resize_device
            decoded = [self._run(self._decode_rgb, source) for source in images]

            def resized() -> torch.Tensor:
                rows = [self.preprocessor.resize_crop(f.result().to(device)) for f in decoded]
                return torch.stack(rows) if rows else torch.empty((0, self.size, self.size, 3), dtype=torch.uint8)

            return _PendingBatch(decoded, resized)
        batch = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8)
        rows = batch.numpy()
        filled = [self._run(self._decode_into, rows[i], source) for i, source in enumerate(images)]
        return _PendingBatch(filled, lambda: batch)

    def decode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """uint8 [N, S, S, 3] for `images` (on `resize_device` if set). The first failure is raised."""
        return self._submit(images).result()

    def batches(self, images: Sequence[ImageInput], batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 batches of `batch_size`. With `prefetch` the next one decodes while the caller works on the
        current one; without, each batch decodes (on all the workers) when the caller asks for it."""
        if not self.prefetch:
            for start in range(0, len(images), batch_size):
                yield self.decode(images[start : start + batch_size])
            return
        pending = self._submit(images[0:batch_size]) if len(images) else None
        for start in range(0, len(images), batch_size):
            assert pending is not None
            current = pending
            next_start = start + batch_size
            pending = (
                self._submit(images[next_start : next_start + batch_size]) if next_start < len(images) else None
            )
            try:
                batch = current.result()
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
            yield batch


@dataclass
class _PendingBatch:
    """A batch being decoded: the per-image futures, and how to assemble the batch once they are done."""

    futures: list[Future[Any]]
    assemble: Callable[[], torch.Tensor]

    def result(self) -> torch.Tensor:
        """Wait for every image (the first failure raises, an ImageError for a bad image), then assemble."""
        for future in self.futures:
            future.result()
        return self.assemble()

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()
