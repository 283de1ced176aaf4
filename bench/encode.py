"""Encode throughput of clipserve's paths against open_clip, transformers and ONNX Runtime, in one process.

    .venv/bin/python bench/encode.py                       # everything (ViT-B-32, ViT-B-16, xlm-roberta text)
    .venv/bin/python bench/encode.py --models ViT-B-32 --workloads image32,e2e32 --repeats 3

Random weights (open_clip 3.3.0's architectures, randomised like tests/checkpoint_factory.py), real photos
(scikit-image / scikit-learn) as 1024x768 JPEGs for the end-to-end rows. For every (model, workload) it prints
items/s (median of `--repeats` timed runs after one warm-up; the runs of one workload's paths interleave, round
by round, so that the machine's drift reaches them alike), the process's RSS and peak RSS, the cosine to fp32
open_clip (min over the distinct inputs) and the same cosine with the batch mean removed (random weights make
all embeddings nearly parallel), and the ratio to the best peer. All paths share the process's allocator:
the first `clipserve.load` on a CPU has glibc keep freed memory (`fast.retain_freed_memory`), so the peers run
with that too (what it gains: `--glibc-default`, in another run). At image batch 32 it also times "floor" rows,
in the same rounds: one batch's Linear GEMMs alone per kernel (`gemm_floors`), what bounds each path; end to
end, "decode only" rows time the decoding and preprocessing alone, inline. `--device cuda` times the GPU
paths (fp32, bf16, fp16, bf16 compiled with CUDA graphs) against open_clip and transformers on the GPU, with
cuBLAS floors; `--workloads image256,e2e256` adds large batches. Paths
whose one-item warm-up predicts more than `--budget` seconds per timed run are skipped and say so (bf16 on
CPUs without AVX-512 BF16, for one).
Results go to bench/results/encode-<host>-<time>.json together with the machine load, which matters: numbers
taken while other processes run are low and noisy; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(ROOT / "tests")
)  # oracles.py (open_clip with torchvision stubbed), checkpoint_factory.py

from checkpoint_factory import randomize, write_open_clip_dir, write_xlmr_tokenizer_json  # noqa: E402
from oracles import open_clip, transformers  # noqa: E402
from serve_load import scratch_dir  # noqa: E402

import clipserve  # noqa: E402
from clipserve.engine import linears, quantize  # noqa: E402
from clipserve.engine.loading import resolve  # noqa: E402
from clipserve.engine.pipeline import DecodePool  # noqa: E402
from clipserve.io.images import Preprocessor  # noqa: E402

MODELS = ("ViT-B-32", "ViT-B-16", "xlm-roberta-base-ViT-B-32")
WORKLOADS = ("image1", "image32", "e2e32", "text1", "text256")
# not run by default: large batches, for GPUs (`--device cuda --workloads image32,image256,e2e256,text256`)
LARGE_WORKLOADS = ("image256", "e2e256")
XLMR = "xlm-roberta-base-ViT-B-32"
LABELS = (
    "golden retriever", "tabby cat", "espresso machine", "space shuttle", "red double-decker bus", "sunflower",
    "mountain bike", "grand piano", "lighthouse", "strawberry", "fire truck", "snowy owl", "sailboat", "pizza",
)  # fmt: skip
TEMPLATES = (
    "a photo of a {}.", "a blurry photo of the {}.", "a close-up photo of a large {}.", "a {} in the wild.",
    "an old black and white photograph of a {}.", "a painting of a {} on a sunny afternoon.",
)  # fmt: skip


@dataclass
class Row:
    model: str
    workload: str
    path: str
    peer: bool
    part: bool = False  # one part of the work ("floor: ...", "decode only: ..."), left out of the ratios
    items_per_s: float | None = None
    runs_s: list[float] = field(default_factory=list)
    rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    cosine_min: float | None = None
    centred_cosine_min: float | None = None
    ratio_to_best_peer: float | None = None
    note: str = ""



def features(output: object) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (the projected features in pooler_output);
    older releases return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output

def rss_mib() -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cosines(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.float(), ref.float()
    plain = F.cosine_similarity(out, ref, dim=-1).min().item()
    centred = F.cosine_similarity(out - out.mean(0), ref - ref.mean(0), dim=-1).min().item()
    return plain, centred


def photos_jpeg(size: tuple[int, int] = (1024, 768)) -> list[bytes]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), *load_sample_images().images]
    out = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
            buffer, "JPEG", quality=90
        )
        out.append(buffer.getvalue())
    return out


def prompts(n: int) -> list[str]:
    """Zero-shot style prompts, 7-16 CLIP tokens; cycled over label x template."""
    return [
        TEMPLATES[i % len(TEMPLATES)].format(LABELS[(i // len(TEMPLATES)) % len(LABELS)]) for i in range(n)
    ]


def cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


@dataclass
class Cell:
    """One (model, workload, path) waiting for its timed runs, which `Bench.flush` interleaves with the other
    cells of its workload."""

    row: Row
    run: Callable[[], object]
    items: int
    warm_s: float


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.photos = photos_jpeg()
        self.device = torch.device(args.device)
        self.tmp = scratch_dir()
        os.environ.setdefault("CLIPSERVE_CACHE", str(self.tmp / "cache"))
        self.per_item: dict[tuple[str, str], float] = {}  # (model, path) -> seconds per item at batch 1
        self.pending: list[Cell] = []  # warmed-up cells of the current workload, timed by `flush`

    # -- running one cell ---------------------------------------------------------------------------------

    def run(
        self,
        model: str,
        workload: str,
        path: str,
        fn: Callable[[list], torch.Tensor],
        inputs: list,
        reference: torch.Tensor | None,
        *,
        peer: bool,
        distinct: int,
    ) -> None:
        """Warm `fn` up once (and take its cosines); its timed runs wait for `flush`."""
        if self.args.paths and not any(p in path for p in self.args.paths):
            return
        row = Row(model, workload, path, peer, part=reference is None)
        # e2e rows ("<path> exact-decode seq") borrow the model-only batch-1 timing of their path
        key = (model, path.split(" exact-decode")[0].split(" fast-decode")[0], workload.startswith("text"))
        estimate = self.per_item.get(key, 0.0) * len(inputs)
        try:
            if estimate > self.args.budget:
                row.note = (
                    f"skipped: warm-up predicts {estimate:.0f} s per run > --budget {self.args.budget:.0f}"
                )
            else:
                with torch.inference_mode():
                    start = time.perf_counter()
                    out = self.synced(fn, inputs)
                    warm = time.perf_counter() - start
                    if len(inputs) == 1:
                        start = time.perf_counter()
                        self.synced(fn, inputs)
                        self.per_item[key] = warm = time.perf_counter() - start
                if reference is not None:
                    row.cosine_min, row.centred_cosine_min = (
                        round(c, 5) for c in cosines(out[:distinct], reference)
                    )
                self.pending.append(Cell(row, lambda: self.synced(fn, inputs), len(inputs), warm))
                return
        except Exception as exc:  # a peer that cannot run here must not stop the others
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        self.record(row)

    def synced(self, fn: Callable[[list], object], inputs: list) -> object:
        """`fn(inputs)`, returned once the device has finished it (GPU kernels run asynchronously)."""
        out = fn(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def flush(self) -> None:
        """Time the pending cells in rounds, each cell once per round, so that the machine's drift during the
        workload reaches every path alike; a cell stops early past 3x `--budget` seconds in all."""
        for _ in range(self.args.repeats):
            for cell in self.pending:
                if cell.row.runs_s and sum(cell.row.runs_s) + cell.warm_s > 3 * self.args.budget:
                    continue
                try:
                    with torch.inference_mode():
                        start = time.perf_counter()
                        cell.run()
                        cell.row.runs_s.append(round(time.perf_counter() - start, 4))
                except Exception as exc:
                    cell.row.note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        for cell in self.pending:
            if cell.row.runs_s:
                cell.row.items_per_s = round(cell.items / statistics.median(cell.row.runs_s), 2)
                if len(cell.row.runs_s) < self.args.repeats:
                    cell.row.note = f"{len(cell.row.runs_s)} runs"
            self.record(cell.row)
        self.pending = []

    def record(self, row: Row) -> None:
        row.rss_mib, row.peak_rss_mib = (round(v) for v in rss_mib())
        self.rows.append(row)
        self.print_row(row)

    def print_row(self, row: Row) -> None:
        rate = f"{row.items_per_s:9.2f}" if row.items_per_s is not None else "        -"
        cos = (
            f"{row.cosine_min:.5f}/{row.centred_cosine_min:.4f}"
            if row.cosine_min is not None
            else "       -      "
        )
        print(
            f"{row.model:26s} {row.workload:8s} {('peer ' if row.peer else '') + row.path:34s} {rate} /s  "
            f"cos {cos}  rss {row.rss_mib:5.0f}/{row.peak_rss_mib:5.0f} MiB  {row.note}",
            flush=True,
        )

    # -- models ---------------------------------------------------------------------------------------------

    def open_clip_checkpoint(self, name: str) -> tuple[torch.nn.Module, Path]:
        oc = open_clip()
        cfg = published_cfg = oc.get_model_config(name)
        if name == XLMR:
            from open_clip.model import CustomTextCLIP

            hf_dir = self.tmp / "xlm-roberta-base-config"
            transformers().XLMRobertaConfig(
                vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
            ).save_pretrained(hf_dir)  # fmt: skip
            cfg = {
                **cfg,
                "text_cfg": {**cfg["text_cfg"], "hf_model_name": str(hf_dir), "hf_model_pretrained": False},
            }
            reference = randomize(CustomTextCLIP(**cfg)).eval()
        else:
            reference = randomize(oc.create_model(name)).eval()
        # the checkpoint names the published text tower (the reference was built from a local config of it)
        directory = write_open_clip_dir(self.tmp / name, reference, published_cfg)
        if name == XLMR:
            write_xlmr_tokenizer_json(directory / "tokenizer.json")
        return reference, directory

    def clipserve_paths(self, directory: Path) -> dict[str, clipserve.Model]:
        specs = {
            "clipserve fp32": {"precision": "fp32"},
            # the same model on torch's default GEMM (MKL addmm): what the oneDNN Linear layers gain
            "clipserve fp32 torch-gemm": {"precision": "fp32"},
            "clipserve fp32 compile": {"precision": "fp32", "compile": True},
            "clipserve bf16": {"precision": "bf16"},
            "clipserve int8": {"precision": "int8"},
            # torch.compile around oneDNN's int8 GEMMs: the per-row quantisation fused into LayerNorm / GELU
            "clipserve int8 compile": {"precision": "int8", "compile": True},
            # the same int8 GEMMs with one activation scale per batch (torch.ao's dynamic quantisation, the
            # fallback; ONNX Runtime's scheme): what per-row quantisation costs or gains
            "clipserve int8 per-batch": {"precision": "int8"},
            "clipserve onnx-fp32": {"backend": "onnx", "precision": "fp32"},
            "clipserve onnx-int8": {"backend": "onnx", "precision": "int8"},
        }
        if self.device.type == "cuda":  # oneDNN, int8 and ONNX Runtime paths are CPU paths
            specs = {
                "clipserve fp32": {"precision": "fp32"},
                "clipserve bf16": {"precision": "bf16"},
                "clipserve fp16": {"precision": "fp16"},
                # CUDA graphs: the kernel launches of small batches replayed as one graph
                "clipserve bf16 compile": {"precision": "bf16", "compile": True},
            }
        models = {}
        for path, kwargs in specs.items():
            if self.args.paths and not any(p in path for p in self.args.paths):
                continue
            start = time.perf_counter()
            if "torch-gemm" in path:
                fallback = mock.patch.object(linears, "onednn_linear_available", lambda: False)
            elif "per-batch" in path:
                fallback = mock.patch.object(quantize, "int8_rows_available", lambda: False)
            else:
                fallback = contextlib.nullcontext()
            with fallback:
                models[path] = clipserve.load(str(directory), batch_size=256, device=self.args.device, **kwargs)
            print(f"  loaded {path} in {time.perf_counter() - start:.1f} s", flush=True)
        return models

    # -- one architecture -------------------------------------------------------------------------------------

    def bench_model(self, name: str) -> None:
        print(f"\n== {name}", flush=True)
        reference, directory = self.open_clip_checkpoint(name)
        paths = self.clipserve_paths(directory)
        tokenizer = next(iter(paths.values())).tokenize if paths else clipserve.load(str(directory)).tokenize
        oc = open_clip()
        oc_tokenizer = oc.get_tokenizer(name) if name != XLMR else None
        peers = self.peers(name, reference, directory)
        pre = oc.image_transform(reference.visual.image_size[0], is_train=False) if name != XLMR else None
        distinct_images = len(self.photos)

        for workload in self.args.workloads:
            if name == XLMR and not workload.startswith("text"):
                continue  # the xlm-roberta model's image tower is ViT-B-32's
            n = int(workload.removeprefix("image").removeprefix("e2e").removeprefix("text"))
            if workload.startswith("text"):
                texts = cycle(prompts(32), n)
                ids = tokenizer(texts)
                oc_ids = oc_tokenizer(texts) if oc_tokenizer else ids
                with torch.inference_mode():
                    ref = reference.encode_text(oc_ids[:32] if n >= 32 else oc_ids).float()
                distinct = min(n, 32)
                for path, m in paths.items():
                    self.run(name, workload, path, lambda x, m=m: m.encode_tokens(x), ids, ref, peer=False,
                             distinct=distinct)  # fmt: skip
                for path, fn in peers["text"].items():
                    self.run(name, workload, path, fn, oc_ids, ref, peer=True, distinct=distinct)
            else:
                jpegs = cycle(self.photos, n)
                pixels = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
                with torch.inference_mode():
                    ref = reference.encode_image(pixels[:distinct_images]).float()
                distinct = min(n, distinct_images)
                if workload.startswith("image"):
                    if n == 32 or self.device.type == "cuda":  # the GEMMs alone, in the same rounds as the paths
                        for kernel, fn in gemm_floors(name, n, self.device).items():
                            self.run(name, workload, f"floor: {kernel}", fn, pixels, None, peer=False,
                                     distinct=distinct)  # fmt: skip
                    for path, m in paths.items():
                        self.run(name, workload, path, lambda x, m=m: m.encode_pixels(x), pixels, ref, peer=False,
                                 distinct=distinct)  # fmt: skip
                    for path, fn in peers["image"].items():
                        self.run(name, workload, path, fn, pixels, ref, peer=True, distinct=distinct)
                else:
                    self.bench_e2e(name, workload, directory, paths, peers, pre, jpegs, ref, distinct)
            self.flush()
        del peers, paths, reference

    def bench_e2e(self, name, workload, directory, paths, peers, pre, jpegs, ref, distinct) -> None:
        """From JPEG bytes: decode + preprocess + model. clipserve decodes inline (in the calling thread) and
        as `encode_image` does by default (`ThreadPlan`: on CPU all cores between batches, on a GPU all cores
        but one while the GPU runs)."""
        for path, m in paths.items():
            for fast in (False, True):
                for plan, workers in (("inline", 0), ("default", None)):
                    self.run(name, workload, f"{path} {'fast' if fast else 'exact'}-decode {plan}",
                             lambda x, m=m, fast=fast, w=workers: m.encode_image(x, fast_decode=fast, decode_workers=w),
                             jpegs, ref, peer=False, distinct=distinct)  # fmt: skip

        def open_clip_pixels(x: list[bytes]) -> torch.Tensor:
            return torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in x])

        for path, fn in peers["image"].items():
            self.run(
                name, workload, path, lambda x, fn=fn: fn(open_clip_pixels(x)), jpegs, ref, peer=True,
                distinct=distinct,
            )
        # what decoding alone costs per image, inline in this thread as on 2 cores (no decode workers)
        preprocessor = Preprocessor(resolve(str(directory)).preprocess_cfg)
        for fast in (False, True):
            self.run(name, workload, f"decode only: clipserve {'fast' if fast else 'exact'}",
                     lambda x, fast=fast: DecodePool(preprocessor, 0, fast_decode=fast).decode(x), jpegs, None,
                     peer=False, distinct=distinct)  # fmt: skip
        self.run(name, workload, "decode only: open_clip", open_clip_pixels, jpegs, None, peer=True, distinct=distinct)

    # -- peers ---------------------------------------------------------------------------------------------

    def peers(self, name: str, reference: torch.nn.Module, directory: Path) -> dict[str, dict[str, Callable]]:
        import copy

        image: dict[str, Callable] = {}
        text: dict[str, Callable] = {}
        device = self.device
        # inputs start on the CPU for every path (clipserve's included) and results come back to it
        fp32 = copy.deepcopy(reference).to(device) if device.type != "cpu" else reference
        bf16 = copy.deepcopy(reference).to(device, torch.bfloat16)
        image["open_clip fp32"] = lambda x: fp32.encode_image(x.to(device)).cpu()
        image["open_clip bf16-weights"] = lambda x: bf16.encode_image(x.to(device, torch.bfloat16)).float().cpu()
        text["open_clip fp32 (77 tok)"] = lambda x: fp32.encode_text(x.to(device)).cpu()
        text["open_clip bf16-weights (77 tok)"] = lambda x: bf16.encode_text(x.to(device)).float().cpu()
        if name != XLMR:
            hf = self.hf_model(directory)
            if hf is not None:
                hf = hf.to(device)

                def hf_image(x: torch.Tensor) -> torch.Tensor:
                    return features(hf.get_image_features(pixel_values=x.to(device))).float().cpu()

                def hf_text(x: torch.Tensor) -> torch.Tensor:
                    inputs = {k: v.to(device) for k, v in hf_text_inputs(x).items()}
                    return features(hf.get_text_features(**inputs)).float().cpu()

                def autocast(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
                    def run(x: torch.Tensor) -> torch.Tensor:
                        with torch.autocast(device.type, dtype=torch.bfloat16):
                            return fn(x)

                    return run

                image["transformers fp32-sdpa"] = hf_image
                text["transformers fp32-sdpa (longest)"] = hf_text
                image["transformers bf16-autocast"] = autocast(hf_image)
                text["transformers bf16-autocast (longest)"] = autocast(hf_text)
            for precision in ("fp32", "int8") if device.type == "cpu" else ():
                session = self.ort_open_clip_image(name, reference, precision)
                image[f"onnxruntime(open_clip) {precision}"] = lambda x, s=session: torch.from_numpy(
                    s.run(None, {"pixels": x.numpy()})[0]
                )
        return {"image": image, "text": text}

    def hf_model(self, directory: Path):
        from clipserve.io import checkpoints

        cfg, _, state = checkpoints.read_directory(directory)
        tf = transformers()
        config = tf.CLIPConfig.from_dict(checkpoints.model_to_hf_config(cfg))
        model = tf.CLIPModel(config)
        model.load_state_dict(checkpoints.to_hf(state), strict=False)
        model.config._attn_implementation = "sdpa"
        return model.eval()

    def ort_open_clip_image(self, name: str, reference: torch.nn.Module, precision: str):
        """open_clip's image tower exported the way its users do (legacy exporter, dynamic batch)."""
        import onnxruntime as ort

        path = self.tmp / f"{name}-open_clip-image.onnx"
        if not path.exists():
            # with grad enabled nn.MultiheadAttention skips its fused fast path, which has no ONNX symbolic
            with torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(
                    reference.visual, (torch.zeros(2, 3, 224, 224),), str(path), input_names=["pixels"],
                    output_names=["embeddings"], dynamic_axes={"pixels": {0: "batch"}, "embeddings": {0: "batch"}},
                    opset_version=17, dynamo=False,
                )  # fmt: skip
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = path.with_suffix(".int8.onnx")
            if not quantized.exists():
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
            path = quantized
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # -- summary -----------------------------------------------------------------------------------------------

    def finish(self) -> Path:
        best: dict[tuple[str, str], float] = {}
        for row in self.rows:
            if row.peer and row.items_per_s and not row.part:
                key = (row.model, row.workload)
                best[key] = max(best.get(key, 0.0), row.items_per_s)
        print("\n== ratio to the best peer (same model and workload)")
        for row in self.rows:
            peer_best = best.get((row.model, row.workload))
            if row.items_per_s and peer_best and not row.peer and not row.part:
                row.ratio_to_best_peer = round(row.items_per_s / peer_best, 2)
                print(f"{row.model:26s} {row.workload:8s} {row.path:44s} {row.ratio_to_best_peer:5.2f}x")
        out_dir = ROOT / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = out_dir / f"encode-{platform.node() or 'host'}-{stamp}.json"
        load_end = os.getloadavg()
        out.write_text(
            json.dumps(
                {
                    "argv": sys.argv,
                    "machine": {
                        "cpu": cpu_name(),
                        "cores": os.cpu_count(),
                        "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(),
                        "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                        "loadavg_start": self.load_start,
                        "loadavg_end": load_end,
                        "glibc_keeps_freed_memory": not self.args.glibc_default and self.device.type == "cpu",
                    },
                    "rows": [asdict(r) for r in self.rows],
                },
                indent=1,
            )  # fmt: skip
        )
        print(f"\nload average at start {self.load_start}, at end {load_end}; wrote {out}")
        return out


def gemm_floors(name: str, batch: int = 32, device: torch.device | None = None) -> dict[str, Callable[[list], None]]:
    """Per kernel, a function that runs every Linear GEMM of one batch of a ViT tower (each block's shapes,
    rows = batch x tokens, once per block) and nothing else: timed like a path, it gives the images/s the tower
    could reach if all its other work were free (attention products and patch embedding are ~5% of its
    FLOPs). Kernels: fp32 through MKL (`addmm`) and oneDNN packed weights; int8 as `precision="int8"` runs it
    (quantising each row, then the GEMM), the same with one scale per batch (torch.ao's dynamic Linear), and
    the int8 GEMMs alone on inputs quantised beforehand: oneDNN's (what clipserve runs), `torch._int_mm` and
    ONNX Runtime's MatMulInteger (MLAS), to show whether another kernel would lower the floor; on a GPU, cuBLAS
    in fp32, bf16 and fp16. What bounds each path here."""
    from clipserve.engine.linears import OneDNNLinear, onednn_linear_available
    from clipserve.engine.quantize import (
        Int8Linear,
        dynamic_int8_linear,
        int8_rows_available,
        quantize_rows,
        quantized_engine,
    )

    vision = open_clip().get_model_config(name)["vision_cfg"]
    width, layers = vision["width"], vision["layers"]
    hidden = int(width * vision.get("mlp_ratio", 4.0))
    rows = batch * ((vision["image_size"] // vision["patch_size"]) ** 2 + 1)
    shapes = [(width, 3 * width), (width, width), (width, hidden), (hidden, width)]
    if device is not None and device.type == "cuda":
        return {f"{dtype} cuBLAS": cuda_floor(shapes, rows, layers, device, dtype) for dtype in ("fp32", "bf16", "fp16")}
    torch.backends.quantized.engine = quantized_engine()

    def int8_gemm_only(w: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        linear = Int8Linear(w, b)
        return lambda q: linear.gemm(q)

    def int_mm_only(w: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        w_t = torch.randint(-127, 128, w.shape, dtype=torch.int8).t()  # s8 x s8 -> int32
        return lambda q: torch._int_mm(q, w_t)

    def ort_matmul_integer_only(w: torch.Tensor, b: torch.Tensor) -> Callable[[np.ndarray], object]:
        import onnx.helper as h
        import onnxruntime as ort
        from onnx import TensorProto, numpy_helper

        n, k = w.shape
        weight = numpy_helper.from_array(np.random.randint(-127, 128, (k, n), dtype=np.int8), "W")
        zero_point = numpy_helper.from_array(np.array(128, dtype=np.uint8), "zp")
        graph = h.make_graph(
            [h.make_node("MatMulInteger", ["X", "W", "zp"], ["Y"])], "gemm",
            [h.make_tensor_value_info("X", TensorProto.UINT8, [None, k])],
            [h.make_tensor_value_info("Y", TensorProto.INT32, [None, n])], [weight, zero_point],
        )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # one session per shape, each with its own thread pool: spinning pools would contend for the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]).SerializeToString(), options,
            providers=["CPUExecutionProvider"],
        )  # fmt: skip
        return lambda q: session.run(None, {"X": q})

    def rows_u8(x: torch.Tensor) -> torch.Tensor:
        return quantize_rows(x)[0]

    # kernel -> (build it from weight and bias, the input it takes from float rows: prepared untimed)
    Kernel = tuple[Callable[[torch.Tensor, torch.Tensor], Callable], Callable[[torch.Tensor], object]]
    kernels: dict[str, Kernel] = {
        "fp32 addmm (MKL)": (lambda w, b: lambda x: torch.addmm(b, x, w.t()), lambda x: x),
        "int8 per-batch dynamic Linear": (dynamic_int8_linear, lambda x: x),
    }
    if onednn_linear_available():
        kernels["fp32 oneDNN packed"] = (OneDNNLinear, lambda x: x)
    if int8_rows_available():
        kernels["int8 per-row Linear"] = (Int8Linear, lambda x: x)
        kernels["int8 oneDNN GEMM alone"] = (int8_gemm_only, rows_u8)
    kernels["int8 torch._int_mm alone"] = (int_mm_only, lambda x: (rows_u8(x).to(torch.int16) - 128).to(torch.int8))
    kernels["int8 ORT MatMulInteger alone"] = (ort_matmul_integer_only, lambda x: rows_u8(x).numpy())

    def floor(make: Callable, prepare: Callable) -> Callable[[list], None]:
        gemms = []
        for k, n in shapes:
            gemms.append((make(torch.randn(n, k), torch.randn(n)), prepare(torch.randn(rows, k))))

        def run(_: list) -> None:
            for _ in range(layers):
                for gemm, x in gemms:
                    gemm(x)

        return run

    return {kernel: floor(make, prepare) for kernel, (make, prepare) in kernels.items()}


def cuda_floor(
    shapes: list[tuple[int, int]], rows: int, layers: int, device: torch.device, dtype: str
) -> Callable[[list], None]:
    """One batch's Linear GEMMs on the GPU in `dtype` (weights and inputs resident; `Bench.synced` waits)."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gemms = [
        (torch.randn(n, k, device=device, dtype=torch_dtype), torch.randn(rows, k, device=device, dtype=torch_dtype))
        for k, n in shapes
    ]

    def run(_: list) -> None:
        for _ in range(layers):
            for weight, x in gemms:
                torch.mm(x, weight.t())

    return run


def hf_text_inputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers users pad to the longest prompt (processor(padding=True)); trim open_clip's 77-token ids."""
    length = int(ids.argmax(dim=-1).max()) + 1
    ids = ids[:, :length]
    mask = torch.ones_like(ids)
    for row, eot in enumerate(ids.argmax(dim=-1).tolist()):
        mask[row, eot + 1 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"subset of {', '.join(WORKLOADS + LARGE_WORKLOADS)}"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (GPU paths: fp32, bf16, fp16, compiled)")
    parser.add_argument(
        "--paths", default="", help="only paths whose name contains one of these (comma-separated)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed rounds per workload after one warm-up (median per cell)"
    )
    parser.add_argument(
        "--budget", type=float, default=20.0, help="skip cells predicted slower than this (s/run)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument(
        "--glibc-default", action="store_true",
        help="leave glibc's allocator as it is: clipserve.load otherwise has it keep freed memory "
        "(`retain_freed_memory`), for every path of this process, peers included",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.glibc_default:
        mock.patch("clipserve.engine.loading.retain_freed_memory", lambda: False).start()
    args.models = [m for m in args.models.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = set(args.models) - set(MODELS) | set(args.workloads) - set(WORKLOADS + LARGE_WORKLOADS)
    if unknown:
        parser.error(f"unknown models/workloads: {sorted(unknown)}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    np.random.seed(0)
    bench = Bench(args)
    bench.load_start = os.getloadavg()
    print(
        f"cpu {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, load average {bench.load_start}"
        + (f", {torch.cuda.get_device_name(bench.device)}" if bench.device.type == "cuda" else "")
    )
    try:
        for name in args.models:
            bench.bench_model(name)
    finally:  # rows measured before a failure are kept
        bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
