"""Dynamic batching: items from concurrent callers coalesced into model batches.

`DynamicBatcher` is the generic mechanism: a bounded queue, one worker thread, batches of at most
`max_batch_size` items, and a wait of at most `max_wait_ms` (counted from the oldest queued item) for a
batch to fill. Each item gets its own `concurrent.futures.Future`, so results go back to the caller that
submitted them whatever batch they ran in; an exception in a batch fails only the items of that batch.

`BatchedModel` puts a `Model` behind two batchers (images, texts) and a shared preprocessing thread pool:

* images are decoded and preprocessed on the pool, one task per image, so decoding overlaps with the
  inference that the batcher's worker runs for other requests, and never runs on an event loop. Decoding
  happens *before* batching: a corrupt image fails its own request (`ItemError` names its position) and
  never reaches a batch;
* texts are tokenized on the pool; the text batcher groups queued prompts of similar token length, since
  the text tower drops the padding columns beyond the longest prompt of a batch.

Backpressure: when admitting a request would exceed `max_queue` items waiting (in preprocessing or in a
queue), `QueueFull` is raised at once instead of letting memory grow.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from clipserve.engine.model import Model
from clipserve.io.images import ImageError, ImageLimits

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The queue cannot take more items now; retry later."""


class BatcherStopped(RuntimeError):
    """The batcher was stopped (model unloaded or server shutting down)."""


class ItemError(ValueError):
    """One input item could not be prepared; `position` is its index in the list that was passed."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    group: int
    enqueued: float


class DynamicBatcher(Generic[T, R]):
    """Coalesces items submitted from any thread into batches run by one worker thread.

    `run(items) -> results` is called with 1..max_batch_size items and must return one result per item.
    `group_key`: when set, a batch is the oldest queued item plus the queued items whose key is closest to
    its key (the oldest item always goes first, so nothing starves). `on_batch(size)` is called before
    each batch runs (metrics, tests).
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        group_key: Callable[[T], int] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < max_batch_size:
            raise ValueError(f"max_queue ({max_queue}) must be >= max_batch_size ({max_batch_size})")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._run = run
        self._group_key = group_key
        self._on_batch = on_batch
        self._pending: list[_Pending[T, R]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.last_batch_failed = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"batcher {self.name} already started")
        self._thread = threading.Thread(target=self._worker, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking items, finish the queued ones, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:  # anything left (worker did not finish in time) fails instead of hanging
            for pending in self._pending:
                if pending.future.set_running_or_notify_cancel():
                    pending.future.set_exception(BatcherStopped(f"{self.name} stopped"))
            self._pending.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        """Items queued and not yet taken into a batch."""
        return len(self._pending)

    # -- submitting ------------------------------------------------------------------------------------

    def submit(self, items: Sequence[T]) -> list[Future[R]]:
        """Queue all of `items` or none of them (QueueFull)."""
        now = time.monotonic()
        with self._cond:
            if self._stopping or self._thread is None:
                raise BatcherStopped(f"{self.name} is not running")
            if len(self._pending) + len(items) > self.max_queue:
                raise QueueFull(f"{self.name}: queue full ({len(self._pending)} of {self.max_queue} items waiting)")
            futures: list[Future[R]] = []
            for item in items:
                future: Future[R] = Future()
                group = self._group_key(item) if self._group_key is not None else 0
                self._pending.append(_Pending(item, future, group, now))
                futures.append(future)
            self._cond.notify_all()
        return futures

    async def run(self, items: Sequence[T]) -> list[R]:
        """Submit from async code and await every result (cancelling the wait cancels queued items)."""
        futures = self.submit(items)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        finally:
            for f in futures:
                f.cancel()  # a no-op for finished futures; drops the still-queued ones of a cancelled call

    # -- worker ----------------------------------------------------------------------------------------

    def _take(self) -> list[_Pending[T, R]]:
        if len(self._pending) <= self.max_batch_size:
            batch, self._pending = self._pending, []
            return batch
        if self._group_key is None:
            batch = self._pending[: self.max_batch_size]
            del self._pending[: self.max_batch_size]
            return batch
        oldest = self._pending[0]
        ranked = sorted(range(1, len(self._pending)), key=lambda i: (abs(self._pending[i].group - oldest.group), i))
        chosen = {0, *ranked[: self.max_batch_size - 1]}
        batch = [p for i, p in enumerate(self._pending) if i in chosen]
        self._pending = [p for i, p in enumerate(self._pending) if i not in chosen]
        return batch

    def _next_batch(self) -> list[_Pending[T, R]] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._pending[0].enqueued + self.max_wait_s
            while len(self._pending) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take()

    def _worker(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = self._run([p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"{self.name}: batch of {len(live)} gave {len(results)} results")
            except Exception as exc:  # fails this batch's callers, never the worker
                log.exception("batch of %d failed in %s", len(live), self.name)
                self.last_batch_failed = True
                for p in live:
                    p.future.set_exception(exc)
                continue
            self.last_batch_failed = False
            self.batches_run += 1
            for p, result in zip(live, results, strict=True):
                p.future.set_result(result)


class BatchObserver(Protocol):
    """Receives batching events (the server's metrics implement it)."""

    def batch_started(self, model: str, modality: str, size: int) -> None: ...

    def image_decoded(self, model: str, ok: bool) -> None: ...


class _NoObserver:
    def batch_started(self, model: str, modality: str, size: int) -> None:
        pass

    def image_decoded(self, model: str, ok: bool) -> None:
        pass


@dataclass(frozen=True)
class BatchSettings:
    """Per model and modality: batch size, coalescing wait and queue bound (items); how images decode."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    # images decode at reduced size and resize with torch (`Preprocessor.decode(fast=True)`): not bit-exact
    fast_decode: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max wait must be >= 0 ms, got {self.max_wait_ms}")
        if self.max_queue < self.max_batch_size:
            raise ValueError(f"max queue ({self.max_queue}) must be >= max batch size ({self.max_batch_size})")


@dataclass(frozen=True)
class PreparedTexts:
    """Token ids [N, context_length] and the real token count of each text (specials included)."""

    tokens: torch.Tensor
    counts: list[int]


class BatchedModel:
    """A `Model` served through dynamic batching; see the module doc."""

    def __init__(
        self,
        name: str,
        model: Model,
        pool: ThreadPoolExecutor,
        settings: BatchSettings = BatchSettings(),
        limits: ImageLimits = ImageLimits(),
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.settings = settings
        self.limits = limits
        self._pool = pool
        self._observer = observer or _NoObserver()
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self.images = DynamicBatcher[torch.Tensor, torch.Tensor](
            f"{name}/image",
            self._encode_pixels,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            on_batch=lambda n: self._observer.batch_started(name, "image", n),
        )
        self.texts = DynamicBatcher[torch.Tensor, torch.Tensor](
            f"{name}/text",
            self._encode_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            group_key=lambda row: int(row.argmax()),  # EOT position = token length - 1
            on_batch=lambda n: self._observer.batch_started(name, "text", n),
        )

    def start(self) -> None:
        self.images.start()
        self.texts.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.images.stop(timeout)
        self.texts.stop(timeout)

    @property
    def healthy(self) -> bool:
        """Workers running and the last batch of each modality succeeded."""
        return all(b.alive and not b.last_batch_failed for b in (self.images, self.texts))

    @property
    def queue_depth(self) -> dict[str, int]:
        return {"image": self.images.depth, "text": self.texts.depth, "preprocessing": self._admitted}

    # -- inference (worker threads) --------------------------------------------------------------------

    def _encode_pixels(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.model.encode_uint8(torch.stack(rows), normalize=True))

    def _encode_tokens(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.model.encode_tokens(torch.stack(rows), normalize=True))

    # -- preparation (pool threads) --------------------------------------------------------------------

    @contextmanager
    def _admission(self, n: int) -> Iterator[None]:
        with self._admit_lock:
            waiting = self._admitted + self.images.depth + self.texts.depth
            if waiting + n > self.settings.max_queue:
                raise QueueFull(f"{self.name}: {waiting} items waiting, limit {self.settings.max_queue}")
            self._admitted += n
        try:
            yield
        finally:
            with self._admit_lock:
                self._admitted -= n

    def _decode(self, data: bytes) -> torch.Tensor:
        try:
            pixels = self.model.preprocessor.decode(data, self.limits, fast=self.settings.fast_decode)
        except ImageError:
            self._observer.image_decoded(self.name, False)
            raise
        self._observer.image_decoded(self.name, True)
        return pixels

    async def prepare_images(self, images: Sequence[bytes]) -> torch.Tensor:
        """Decode, resize and crop on the pool -> uint8 [N, S, S, 3]; the first bad image raises ItemError.

        uint8 until the batch runs (normalised on the model's device): a quarter of float32's memory per queued
        image."""
        loop = asyncio.get_running_loop()
        with self._admission(len(images)):
            tasks = [loop.run_in_executor(self._pool, self._decode, data) for data in images]
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for position, result in enumerate(results):
            if isinstance(result, ImageError):
                raise ItemError(position, str(result))
            if isinstance(result, BaseException):
                raise result
        size = self.model.preprocess_cfg.size
        return torch.stack(results) if results else torch.empty(0, size, size, 3, dtype=torch.uint8)  # type: ignore[arg-type]

    async def prepare_texts(self, texts: Sequence[str]) -> PreparedTexts:
        """Tokenize on the pool."""
        loop = asyncio.get_running_loop()

        def tokenize() -> PreparedTexts:
            return PreparedTexts(self.model.tokenize(list(texts)), self.model.tokenizer.count_tokens(list(texts)))

        with self._admission(len(texts)):
            return await loop.run_in_executor(self._pool, tokenize)

    async def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, S, S, 3] (`prepare_images`) -> L2-normalised [N, D] through the image batcher."""
        if len(pixels) == 0:
            return torch.empty(0, self.model.embed_dim)
        return torch.stack(await self.images.run(list(pixels)))

    async def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> L2-normalised [N, D] through the text batcher."""
        if len(tokens) == 0:
            return torch.empty(0, self.model.embed_dim)
        return torch.stack(await self.texts.run(list(tokens)))

    async def text_classifier(self, labels: Sequence[str], templates: Sequence[str] | None) -> torch.Tensor:
        """`Model.text_classifier` with its prompts run through the text batcher, like any other text: one
        inference thread, the queue bound, batched with concurrent requests. Cached in the model's LRU."""
        key, prompts = self.model.classifier_prompts(labels, templates)
        cached = self.model.label_cache.get(key)
        if cached is not None:
            return cached
        embeddings = []
        for start in range(0, len(prompts), self.settings.max_batch_size):  # any label count fits the queue
            texts = await self.prepare_texts(prompts[start : start + self.settings.max_batch_size])
            embeddings.append(await self.encode_texts(texts.tokens))
        return self.model.cache_classifier(key, torch.cat(embeddings))


__all__ = [
    "BatchObserver",
    "BatchSettings",
    "BatchedModel",
    "BatcherStopped",
    "DynamicBatcher",
    "ItemError",
    "PreparedTexts",
    "QueueFull",
]
