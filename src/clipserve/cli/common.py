"""Arguments and helpers shared by every command that loads a model."""

from __future__ import annotations

import argparse

from clipserve.registry import DEFAULT_MODEL

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16", "int8")  # engine.loading's, without importing torch
BACKEND_CHOICES = ("torch", "onnx")
COMPILE_HELP = "torch.compile the towers (CUDA graphs on a GPU); they compile at load, a minute or more on CPU"
FAST_DECODE_HELP = (
    "decode JPEGs at reduced size and resize with torch instead of Pillow: several times less CPU per photo, "
    "not bit-exact to open_clip's preprocessing"
)
PRECISION_HELP = "fp32 (exact), bf16, fp16, int8 (CPU), or auto: bf16 on a GPU, int8 on CPUs with VNNI/AMX, else fp32"


def add_model_arguments(
    parser: argparse.ArgumentParser, *, positional: bool = True, precision: str = "auto"
) -> None:
    """MODEL (or --model), --checkpoint, the runtime arguments, --batch-size."""
    help_text = (
        "pretrained name (e.g. ViT-B-32/datacomp_xl_s13b_b90k), hf-hub:ORG/REPO, a local checkpoint directory, "
        "or an architecture name with --checkpoint"
    )
    if positional:
        parser.add_argument("model", metavar="MODEL", help=help_text)
    else:
        parser.add_argument("--model", default=DEFAULT_MODEL, help=help_text + f" (default {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights file (or directory) for an architecture name")
    add_runtime_arguments(parser, precision=precision)
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size (default 64)")


def add_runtime_arguments(parser: argparse.ArgumentParser, *, precision: str = "auto") -> None:
    """--device, --precision, --backend, --compile: how a model runs (`precision`: the command's default)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument(
        "--precision", default=precision, choices=PRECISION_CHOICES, help=f"{PRECISION_HELP} (default {precision})"
    )
    parser.add_argument(
        "--backend",
        default="torch",
        choices=BACKEND_CHOICES,
        help="torch, or onnx (ONNX Runtime on an export cached per checkpoint; cpu, fp32 or int8) (default torch)",
    )
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def runtime_options(args: argparse.Namespace) -> dict[str, object]:
    """`load` keyword arguments from `add_runtime_arguments`' options."""
    return {"device": args.device, "precision": args.precision, "backend": args.backend, "compile": args.compile}


def load_model(args: argparse.Namespace):  # -> clipserve.Model (imported lazily: --help stays fast)
    from clipserve.engine.loading import load

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    return load(args.model, checkpoint=args.checkpoint, batch_size=args.batch_size, **runtime_options(args))
