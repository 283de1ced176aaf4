"""Image decoding on a worker pool, overlapped with inference.

`DecodePool.batches` decodes batch i+1 on the pool while the caller runs the model on batch i. Decoding
(Pillow's JPEG decoder and resize) releases the GIL, so threads are enough. Each worker writes its image's
resized, cropped RGB pixels straight into its row of one preallocated uint8 [N, S, S, 3] batch buffer; the
model side turns that buffer into normalised floats in one pass (`fast.normalise_uint8`).

`fast_decode=True` decodes JPEGs with `open_image(draft_size=S)` (DCT-domain downscale by 1/2..1/8 before
the resize): 3-4x less decode work for a 1024x768 photo, not bit-exact (cosine to the exact path is
reported by bench/encode.py and asserted in tests/test_fast.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from clipserve.io.images import ImageInput, ImageLimits, Preprocessor, open_image


class DecodePool:
    """Decode and preprocess images into uint8 batches on `workers` threads (0: in the calling thread)."""

    def __init__(
        self,
        preprocessor: Preprocessor,
        workers: int = 1,
        *,
        fast_decode: bool = False,
        limits: ImageLimits | None = None,
    ) -> None:
        self.preprocessor = preprocessor
        self.size = preprocessor.size
        self.fast_decode = fast_decode
        self.limits = limits or ImageLimits()
        self.workers = workers
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
        image = open_image(source, self.limits, draft_size=self.size if self.fast_decode else None)
        out[...] = self.preprocessor.to_uint8(image)

    def _submit(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, list[Future[None]]]:
        batch = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8)
        rows = batch.numpy()
        if self._executor is None:
            for i, source in enumerate(images):
                self._decode_into(rows[i], source)
            return batch, []
        return batch, [
            self._executor.submit(self._decode_into, rows[i], source) for i, source in enumerate(images)
        ]

    def decode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """uint8 [N, S, S, 3] for `images`, decoded on the pool. The first failure is raised (ImageError)."""
        batch, pending = self._submit(images)
        for future in pending:
            future.result()
        return batch

    def batches(self, images: Sequence[ImageInput], batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 batches of `batch_size`, the next one decoding while the caller works on the current one."""
        starts = range(0, len(images), batch_size)
        pending = self._submit(images[0:batch_size]) if len(images) else None
        for start in starts:
            assert pending is not None
            batch, futures = pending
            next_start = start + batch_size
            pending = (
                self._submit(images[next_start : next_start + batch_size])
                if next_start < len(images)
                else None
            )
            try:
                for future in futures:
                    future.result()
            except BaseException:
                if pending is not None:
                    for future in pending[1]:
                        future.cancel()
                raise
            yield batch
