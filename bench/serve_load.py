"""Load test for `clipserve serve`: N concurrent clients on loopback for a bounded time.

Reports throughput (requests/s and items/s), p50/p99 latency and errors by status. Either targets a running
server (`--url`) or starts one in this process on 127.0.0.1 with a model given by `--model` (anything
`clipserve.load` accepts) or `--random-arch` (random weights of a registry architecture: the compute of,
e.g., ViT-B-32 without downloading it).

    python bench/serve_load.py --random-arch ViT-B-32 --mode image --concurrency 16 --duration 30 \
        --device cuda --json bench/results/serve_load_vitb32.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

KEY = "bench-key-0123456789abcdef"


@dataclass
class Result:
    mode: str
    concurrency: int
    duration_s: float
    requests: int
    items: int
    errors: dict[str, int]
    requests_per_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float


def jpeg_data_urls(n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[str]:
    """Photo-sized JPEGs (smooth noise, so they compress like photos), as data URLs."""
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def payloads(mode: str, model: str, per_request: int) -> list[dict]:
    images = jpeg_data_urls(8)
    texts = [f"a photo of a {w}" for w in ("cat", "dog", "red car on a street at night", "bird", "house")]
    out = []
    for i in range(8):
        if mode == "image":
            items = [images[(i + k) % len(images)] for k in range(per_request)]
            out.append({"model": model, "input": items})
        elif mode == "text":
            out.append({"model": model, "input": [texts[(i + k) % len(texts)] for k in range(per_request)]})
        else:  # classify
            items = [images[(i + k) % len(images)] for k in range(per_request)]
            out.append({"model": model, "input": items, "labels": ["cat", "dog", "car", "bird", "house"]})
    return out


async def run_load(url: str, key: str, mode: str, model: str, concurrency: int, duration: float,
                   per_request: int) -> Result:
    route = "/v1/classifications" if mode == "classify" else "/v1/embeddings"
    bodies = payloads(mode, model, per_request)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                 limits=limits) as client:
        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = await client.post(route, json=bodies[i % len(bodies)])
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    return Result(
        mode=mode, concurrency=concurrency, duration_s=round(elapsed, 2), requests=len(latencies),
        items=len(latencies) * per_request, errors=dict(errors),
        requests_per_s=round(len(latencies) / elapsed, 2), items_per_s=round(len(latencies) * per_request / elapsed, 2),
        p50_ms=round(ms[len(ms) // 2], 2), p99_ms=round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        mean_ms=round(statistics.fmean(ms), 2),
    )


def scratch_dir() -> Path:
    """A temporary directory for this process's files (a random ViT-B checkpoint is 0.6 GB, its ONNX exports
    as much again), removed when the process exits."""
    return Path(_scratch().name)


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="clipserve-bench-")  # its finalizer removes it at exit


def random_model(arch: str, device: str, precision: str, compile: bool):
    """A registry architecture with random weights, loaded like a checkpoint (so every precision works)."""
    from safetensors.torch import save_file

    import clipserve
    from clipserve.models.clip import CLIP
    from clipserve.registry import architecture

    path = Path(tempfile.mkdtemp(dir=scratch_dir())) / "random.safetensors"  # its own directory: exports go beside it
    save_file(CLIP(architecture(arch)).init_weights(0).state_dict(), str(path))
    return clipserve.load(arch, checkpoint=str(path), device=device, precision=precision, compile=compile)


def start_server(args: argparse.Namespace) -> tuple[str, str, object, str]:
    """Serve one model in this process: (url, model name, uvicorn server, the precision that `auto` chose)."""
    import uvicorn

    import clipserve
    from clipserve.api import AuthSettings, ServerSettings, create_app
    from clipserve.engine.batching import BatchSettings

    model = (random_model(args.random_arch, args.device, args.precision, args.compile) if args.random_arch
             else clipserve.load(args.model, device=args.device, precision=args.precision, compile=args.compile))
    alias = "bench"
    settings = ServerSettings(
        host="127.0.0.1", port=args.port, state_dir=Path(args.state_dir or tempfile.mkdtemp(dir=scratch_dir())),
        auth=AuthSettings(api_keys=(KEY,)),
        batching=BatchSettings(args.max_batch_size, args.max_wait_ms, max_queue=4096, fast_decode=args.fast_decode),
        preprocess_workers=args.preprocess_workers,
    )
    app = create_app(settings, {alias: model})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("server failed to start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{args.port}", alias, server, model.info.precision


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="target a running server instead of starting one")
    p.add_argument("--key", default=KEY, help="API key for --url")
    p.add_argument("--model", help="model to start a server with (what clipserve.load accepts)")
    p.add_argument("--random-arch", help="start a server with random weights of this architecture (e.g. ViT-B-32)")
    p.add_argument("--served-name", default="bench", help="model name to request (with --url)")
    p.add_argument("--mode", choices=("image", "text", "classify"), default="image")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (bounded)")
    p.add_argument("--per-request", type=int, default=1, help="items per request")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="as `clipserve serve --precision` (default auto)")
    p.add_argument("--compile", action="store_true", help="as `clipserve serve --compile`")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--preprocess-workers", type=int, default=8)
    p.add_argument("--fast-decode", action="store_true", help="the server's --fast-decode")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--state-dir", default=None, help="API-key database directory (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the result as JSON here (e.g. bench/results/x.json)")
    args = p.parse_args()

    server, precision = None, args.precision  # a --url server's own setting is not known here
    if args.url:
        url, model, key = args.url, args.served_name, args.key
    elif args.model or args.random_arch:
        url, model, server, precision = start_server(args)
        key = KEY
    else:
        p.error("give --url, --model or --random-arch")
    # Warm-up (first CUDA kernels, allocator), not counted.
    asyncio.run(run_load(url, key, args.mode, model, min(4, args.concurrency), 2.0, args.per_request))
    result = asyncio.run(run_load(url, key, args.mode, model, args.concurrency, args.duration, args.per_request))
    if server is not None:
        server.should_exit = True
    summary = {**asdict(result), "target": url, "model": args.random_arch or args.model or model,
               "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "fast_decode": args.fast_decode,
               "precision": precision, "compile": args.compile, "preprocess_workers": args.preprocess_workers,
               "python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    print(f"{result.mode}: {result.requests_per_s} req/s, {result.items_per_s} items/s, p50 {result.p50_ms} ms, "
          f"p99 {result.p99_ms} ms, errors {result.errors or 'none'} "
          f"({result.requests} requests, concurrency {result.concurrency}, {result.duration_s}s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
