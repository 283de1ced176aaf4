"""Where one image batch's time goes, end to end: decoding, the model, and the model's ops by kind.

What bounds a path that misses its target (bench/encode.py gives the ratios to the peers; this gives the
parts). For one architecture, precision and batch, with random weights and the same 1024x768 photos as
bench/encode.py, it times in interleaved rounds:
- decoding alone, as `Model.encode_image` does it on this device (`ThreadPlan`: on CPU all cores, in a burst);
- the model alone on the decoded uint8 batch (`Model.encode_uint8`);
- both, through `Model.encode_image`;
- oneDNN's int8 GEMM alone on the batch's Linear shapes (bench/encode.py's floor), for int8;
then profiles the model forward (torch.profiler, inductor's kernels named where `compile=True`) and sums the
ops' own time by kind: int8 GEMM, fp32 GEMM, attention, patch convolution, compiled (fused) elementwise
kernels, eager elementwise ops, and the rest (Python and framework, the part no kernel accounts for).

    .venv/bin/python -u bench/breakdown.py --model ViT-B-32 --precision int8 --compile --fast-decode

Prints ms per batch and per-image rates; writes bench/results/breakdown-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from encode import cpu_name, gemm_floors, photos_jpeg
from serve_load import random_model

from clipserve.engine.fast import ThreadPlan
from clipserve.engine.pipeline import DecodePool

ROOT = Path(__file__).resolve().parent.parent

# Op kinds, matched against profiler event names in this order (the first match wins).
KINDS: list[tuple[str, tuple[str, ...]]] = [
    # first: inductor names its kernels after every op they fuse ("graph_0_cpp_fused_add_..._int8_gemm_...")
    ("compiled elementwise (fused)", ("cpp_fused",)),
    ("int8 GEMM", ("qlinear", "int8_gemm", "quantized::linear")),
    ("fp32 GEMM", ("addmm", "aten::mm", "_linear_pointwise", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "bmm", "softmax")),
    ("patch convolution", ("conv",)),
    ("eager elementwise", (
        "layer_norm", "gelu", "aten::add", "aten::mul", "aten::div", "aten::sub", "amax", "amin", "quantize",
        "aten::maximum", "clamp", "round", "aten::copy_", "aten::to", "aten::cat", "aten::sum", "aten::norm",
        "addcmul", "aten::neg", "aten::exp", "sigmoid",
    )),
]  # fmt: skip


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(key in name for key in keys)), "")


def timed(fn: Callable[[], object], rounds: list[float]) -> Callable[[], None]:
    """A timed step for `time_rounds`: runs `fn` and appends its seconds to `rounds`."""

    def step() -> None:
        start = time.perf_counter()
        fn()
        rounds.append(time.perf_counter() - start)

    return step


def time_rounds(parts: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each part, the parts interleaved in `repeats` rounds (the VM drifts)."""
    runs: dict[str, list[float]] = {name: [] for name in parts}
    steps = [timed(fn, runs[name]) for name, fn in parts.items()]
    with torch.inference_mode():
        for step in steps:  # warm-up
            step()
        for times in runs.values():
            times.clear()
        for _ in range(repeats):
            for step in steps:
                step()
    return {name: statistics.median(times) for name, times in runs.items()}


def profile_by_kind(forward: Callable[[], object], repeats: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Seconds per forward by op kind (ops' own time on the calling thread, which holds each op's OpenMP
    region), the wall time's unaccounted rest under "rest", and the ten costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        forward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                forward()
            wall = (time.perf_counter() - start) / repeats
    by_kind: dict[str, float] = defaultdict(float)
    ops: list[tuple[str, float]] = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / repeats
        kind = kind_of(event.key)
        if kind:
            by_kind[kind] += seconds
            ops.append((event.key, seconds))
    by_kind["rest"] = max(0.0, wall - sum(by_kind.values()))
    by_kind["wall"] = wall
    return dict(by_kind), sorted(ops, key=lambda op: -op[1])[:10]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="a registry architecture (default ViT-B-32)")
    parser.add_argument("--precision", default="int8", help="fp32, bf16, fp16, int8 or auto (default int8)")
    parser.add_argument("--compile", action="store_true", help="load with compile=True")
    parser.add_argument("--fast-decode", action="store_true", help="decode with fast_decode=True")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    args = parser.parse_args(argv)

    # inductor's kernels appear in the profile under their names only with this set before compiling
    torch._inductor.config.cpp.enable_kernel_profile = True
    model = random_model(args.model, args.device, args.precision, args.compile)
    model.batch_size = args.batch
    photos = photos_jpeg()
    jpegs = [photos[i % len(photos)] for i in range(args.batch)]
    plan = ThreadPlan.for_device(torch.device(args.device).type)
    pool = DecodePool(model.preprocessor, plan.decode_workers, fast_decode=args.fast_decode)
    pixels = pool.decode(jpegs)

    def model_only() -> None:
        model.encode_uint8(pixels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    parts: dict[str, Callable[[], object]] = {
        "decode": lambda: pool.decode(jpegs),
        "model": model_only,
        "end to end": lambda: model.encode_image(jpegs, fast_decode=args.fast_decode),
    }
    if args.precision == "int8" and args.device == "cpu":
        floors = gemm_floors(args.model, args.batch)
        if "int8 oneDNN GEMM alone" in floors:
            parts["floor: int8 GEMM alone"] = lambda: floors["int8 oneDNN GEMM alone"]([])
    seconds = time_rounds(parts, args.repeats)
    by_kind, top_ops = profile_by_kind(model_only, args.repeats)
    pool.close()

    print(f"{args.model} {args.precision}{' compile' if args.compile else ''} batch {args.batch}, "
          f"{'fast' if args.fast_decode else 'exact'} decode on {plan.decode_workers} threads "
          f"({'overlapped' if plan.overlap else 'in bursts'}), {cpu_name()}")  # fmt: skip
    for name, s in seconds.items():
        print(f"  {name:28s} {s * 1e3:8.1f} ms/batch  {args.batch / s:8.1f} images/s")
    print(f"  model forward by op kind (profiled, {by_kind['wall'] * 1e3:.1f} ms/batch under the profiler):")
    for kind, s in by_kind.items():
        if kind != "wall":
            print(f"    {kind:30s} {s * 1e3:8.1f} ms  {100 * s / by_kind['wall']:5.1f}%")
    print("  costliest ops (own time):")
    for name, s in top_ops:
        print(f"    {name[:60]:60s} {s * 1e3:8.1f} ms")

    out = ROOT / "bench" / "results" / f"breakdown-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "args": vars(args),
        "cpu": cpu_name(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "decode_workers": plan.decode_workers,
        "ms_per_batch": {name: round(s * 1e3, 2) for name, s in seconds.items()},
        "images_per_s": {name: round(args.batch / s, 2) for name, s in seconds.items()},
        "profile_ms_per_batch": {kind: round(s * 1e3, 2) for kind, s in by_kind.items()},
        "top_ops_ms": [[name, round(s * 1e3, 2)] for name, s in top_ops],
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
