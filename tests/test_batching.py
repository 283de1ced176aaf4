"""DynamicBatcher and BatchedModel: coalescing, routing, grouping, backpressure, isolation, draining."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from clipserve.engine.batching import (
    BatchedModel,
    BatcherStopped,
    BatchSettings,
    DynamicBatcher,
    ItemError,
    QueueFull,
)


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [x * 10 for x in items]


def test_concurrent_submitters_share_batches_and_get_their_own_results() -> None:
    run = Recorder()
    batcher = DynamicBatcher("t", run, max_batch_size=8, max_wait_ms=2000, max_queue=64)
    batcher.start()
    results: dict[int, list[int]] = {}

    def caller(i: int) -> None:
        futures = batcher.submit([i, i + 100])
        results[i] = [f.result(10) for f in futures]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.stop()
    assert results == {i: [i * 10, (i + 100) * 10] for i in range(4)}
    assert [len(b) for b in run.batches] == [8]  # full batch before the 2 s wait ran out


def test_max_wait_bounds_latency_of_a_lone_item() -> None:
    batcher = DynamicBatcher("t", Recorder(), max_batch_size=64, max_wait_ms=20, max_queue=64)
    batcher.start()
    start = time.monotonic()
    assert batcher.submit([3])[0].result(5) == 30
    assert time.monotonic() - start < 2.0
    batcher.stop()


def test_batches_never_exceed_max_size() -> None:
    run = Recorder()
    batcher = DynamicBatcher("t", run, max_batch_size=3, max_wait_ms=50, max_queue=64)
    batcher.start()
    futures = batcher.submit(list(range(10)))
    assert [f.result(5) for f in futures] == [x * 10 for x in range(10)]
    batcher.stop()
    assert max(len(b) for b in run.batches) == 3 and sum(len(b) for b in run.batches) == 10


def test_group_key_batches_similar_lengths_oldest_first() -> None:
    gate = threading.Event()
    run = Recorder()

    def first_blocks(items: list[int]) -> list[int]:
        gate.wait(10)
        return run(items)

    batcher = DynamicBatcher("t", first_blocks, max_batch_size=3, max_wait_ms=0, max_queue=64, group_key=lambda x: x)
    batcher.start()
    head = batcher.submit([0])
    time.sleep(0.1)  # the worker holds item 0; the rest queue up behind it
    futures = batcher.submit([5, 50, 51, 6, 52, 7])
    gate.set()
    assert [f.result(5) for f in head + futures] == [0, 50, 500, 510, 60, 520, 70]
    batcher.stop()
    assert run.batches == [[0], [5, 6, 7], [50, 51, 52]]


def test_full_queue_raises_and_accepts_all_or_nothing() -> None:
    gate = threading.Event()

    def blocked(items: list[int]) -> list[int]:
        gate.wait(10)
        return items

    batcher = DynamicBatcher("t", blocked, max_batch_size=1, max_wait_ms=0, max_queue=2)
    batcher.start()
    first = batcher.submit([1])
    time.sleep(0.1)  # the worker took item 1 and is blocked on it
    queued = batcher.submit([2, 3])
    with pytest.raises(QueueFull):
        batcher.submit([4])
    assert batcher.depth == 2
    gate.set()
    assert [f.result(5) for f in first + queued] == [1, 2, 3]
    batcher.stop()


def test_a_failing_batch_fails_only_its_items_and_the_worker_survives() -> None:
    def run(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("bad batch")
        return items

    batcher = DynamicBatcher("t", run, max_batch_size=1, max_wait_ms=0, max_queue=8)
    batcher.start()
    bad, good = batcher.submit([-1]), batcher.submit([2])
    with pytest.raises(ValueError, match="bad batch"):
        bad[0].result(5)
    assert good[0].result(5) == 2
    assert batcher.alive and not batcher.last_batch_failed
    batcher.stop()


def test_stop_drains_queued_items_then_refuses() -> None:
    run = Recorder(delay=0.05)
    batcher = DynamicBatcher("t", run, max_batch_size=2, max_wait_ms=0, max_queue=64)
    batcher.start()
    futures = batcher.submit(list(range(6)))
    batcher.stop()
    assert [f.result(0) for f in futures] == [x * 10 for x in range(6)]
    with pytest.raises(BatcherStopped):
        batcher.submit([1])


def test_cancelled_waiters_are_skipped() -> None:
    gate = threading.Event()
    run = Recorder()

    def blocked(items: list[int]) -> list[int]:
        gate.wait(10)
        return run(items)

    batcher = DynamicBatcher("t", blocked, max_batch_size=1, max_wait_ms=0, max_queue=8)
    batcher.start()
    batcher.submit([1])
    time.sleep(0.1)
    dropped, kept = batcher.submit([2]), batcher.submit([3])
    assert dropped[0].cancel()
    gate.set()
    assert kept[0].result(5) == 30
    batcher.stop()
    assert [2] not in run.batches


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 40), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_batched_model_matches_model_and_names_bad_items(tiny_model) -> None:
    images = [png((255, 0, 0)), png((0, 255, 0))]
    texts = ["a red square", "green", "a much longer prompt about a green rectangle on a table"]
    with ThreadPoolExecutor(2) as pool:
        batched = BatchedModel("tiny", tiny_model, pool, BatchSettings(max_batch_size=4, max_wait_ms=1))
        batched.start()

        async def scenario() -> None:
            pixels = await batched.prepare_images(images)
            got = await batched.encode_images(pixels)
            torch.testing.assert_close(got, tiny_model.encode_image(images, normalize=True), atol=1e-5, rtol=0)
            prepared = await batched.prepare_texts(texts)
            assert prepared.counts == tiny_model.tokenizer.count_tokens(texts)
            got = await batched.encode_texts(prepared.tokens)
            torch.testing.assert_close(got, tiny_model.encode_text(texts, normalize=True), atol=1e-5, rtol=0)
            with pytest.raises(ItemError) as info:
                await batched.prepare_images([images[0], b"not an image", images[1]])
            assert info.value.position == 1

        asyncio.run(scenario())
        assert batched.healthy
        batched.stop()
        assert not batched.healthy


def test_fast_decode_setting_decodes_like_the_model(tiny_model) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buffer, "JPEG")
    images = [buffer.getvalue(), png((0, 0, 255))]

    async def embed(batched: BatchedModel) -> torch.Tensor:
        pixels = await batched.prepare_images(images)
        assert pixels.dtype == torch.uint8 and pixels.shape == (2, 32, 32, 3)  # normalised in the batch
        return await batched.encode_images(pixels)

    with ThreadPoolExecutor(2) as pool:
        runs = {}
        for fast in (False, True):
            batched = BatchedModel("tiny", tiny_model, pool, BatchSettings(max_batch_size=4, fast_decode=fast))
            batched.start()
            runs[fast] = asyncio.run(embed(batched))
            batched.stop()
            expected = tiny_model.encode_image(images, normalize=True, fast_decode=fast)
            torch.testing.assert_close(runs[fast], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(runs[True], runs[False], atol=1e-5, rtol=0)  # the setting took effect


def test_admission_is_bounded(tiny_model) -> None:
    with ThreadPoolExecutor(1) as pool:
        batched = BatchedModel("tiny", tiny_model, pool, BatchSettings(max_batch_size=2, max_queue=2))
        batched.start()
        with pytest.raises(QueueFull):
            asyncio.run(batched.prepare_texts(["a", "b", "c"]))
        batched.stop()
