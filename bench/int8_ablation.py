"""What each part of precision="int8" gains, measured in one process: the same ViT with int8 built five ways.

- "Linear layers only, every token through the last block": every Linear (packed q/k/v included) an
  `Int8Linear`; the MLP quantises its GELU output by its measured row max, the patch convolution stays fp32,
  attention is torch's fp32 flash attention; the last block computes every token's output, as open_clip does;
- "Linear layers only": the same, with the last block computing the class token's output alone (what every
  precision runs);
- "+ Int8MLP, int8 patch GEMM": `quantize_int8(...)`;
- "+ uint8 pixels, normalisation folded": `quantize_int8(..., pixels=...)`, what `load` builds eager: the
  patch GEMM takes the decoder's uint8 pixels, which the variants above take normalised;
- "+ bf16 attention products": `quantize_int8(..., bf16_products=True, pixels=...)`, what `load` builds with
  `compile=True` on CPUs with bf16 dot products.

Random weights (seeded), one random uint8 batch as the decoders leave it, which each timed call turns into the
tower's input as `Model.encode_uint8` does (`normalise_uint8`, or as it is); eager and with `compile=True`.
The variants' timed runs interleave round by round so that the VM's drift reaches them alike. Prints images/s
(median) and the centred cosine to the fp32 tower; writes bench/results/int8-ablation-<host>-<time>.json.

    .venv/bin/python -u bench/int8_ablation.py --model ViT-B-32 --batch 32 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from encode import cpu_name

from clipserve.config import PreprocessConfig
from clipserve.engine.fast import normalise_uint8, retain_freed_memory
from clipserve.engine.linears import swap_linears
from clipserve.engine.loading import compile_towers
from clipserve.engine.quantize import Int8Linear, quantize_int8, takes_uint8_pixels
from clipserve.models.clip import CLIP
from clipserve.registry import architecture

ROOT = Path(__file__).resolve().parent.parent
PIXELS = PreprocessConfig()  # CLIP's normalisation (the values only scale the random batch)


def every_token_through_last_block(model: CLIP) -> CLIP:
    """The image tower as open_clip runs it: the last block computes every token's output, not just the
    class token's (`Transformer.forward`'s `pooled_tokens` dropped)."""
    transformer = model.visual.transformer
    forward = transformer.forward
    transformer.forward = lambda x, causal=False, pooled_tokens=None: forward(x, causal)
    return model


def variants(base: CLIP, compile: bool) -> dict[str, CLIP]:
    built = {
        "Linear layers only, every token through the last block": every_token_through_last_block(
            swap_linears(copy.deepcopy(base), Int8Linear)
        ),
        "Linear layers only": swap_linears(copy.deepcopy(base), Int8Linear),
        "+ Int8MLP, int8 patch GEMM": quantize_int8(copy.deepcopy(base), bf16_products=False),
        "+ uint8 pixels, normalisation folded": quantize_int8(copy.deepcopy(base), pixels=PIXELS),
        "+ bf16 attention products": quantize_int8(copy.deepcopy(base), bf16_products=True, pixels=PIXELS),
    }
    return {name: compile_towers(module) if compile else module for name, module in built.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="a registry architecture")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per variant")
    args = p.parse_args(argv)
    retain_freed_memory()  # as `load` on a CPU
    base = CLIP(architecture(args.model)).init_weights(0).eval()
    size = base.cfg.vision.image_size
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=generator)

    def encode_uint8(model: CLIP) -> torch.Tensor:
        """`Model.encode_uint8` without the `Model`."""
        if takes_uint8_pixels(model):
            return model.encode_image(batch.permute(0, 3, 1, 2))
        return model.encode_image(normalise_uint8(batch, PIXELS.mean, PIXELS.std))

    result: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        reference = base.encode_image(normalise_uint8(batch, PIXELS.mean, PIXELS.std))
        for mode in ("eager", "compiled"):
            models = variants(base, compile=mode == "compiled")
            times: dict[str, list[float]] = {name: [] for name in models}
            cosines = {}
            for name, model in models.items():  # warm-up (compiles) and cosine
                out = encode_uint8(model)
                centred = F.cosine_similarity(out - out.mean(0), reference - reference.mean(0))
                cosines[name] = float(centred.min())
            for _ in range(args.rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    encode_uint8(model)
                    times[name].append(time.perf_counter() - start)
            result[mode] = {
                name: {
                    "images_per_s": round(args.batch / statistics.median(ts), 2),
                    "centred_cosine_min": round(cosines[name], 5),
                }
                for name, ts in times.items()
            }
            for name, row in result[mode].items():
                print(f"{args.model} batch {args.batch} {mode:8s} {name:55s} {row['images_per_s']:7.1f} images/s"
                      f"  centred cosine to fp32 {row['centred_cosine_min']:.5f}", flush=True)  # fmt: skip
    out = ROOT / "bench" / "results" / f"int8-ablation-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"args": vars(args), "cpu": cpu_name(), "torch": torch.__version__, "rows": result}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
