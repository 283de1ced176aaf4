"""`clipserve export onnx MODEL`: write the image and text towers as ONNX graphs."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to another runtime's format")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="ONNX graphs for ONNX Runtime",
        description=(
            "Write image.onnx (float pixels [N,3,S,S] -> [N,D]) and text.onnx (token ids [N,L] trimmed to the "
            "longest row -> [N,D]) with dynamic batch and text length. Without --output the graphs go to the "
            "cache that `--backend onnx` reads, keyed by a hash of the weights."
        ),
    )
    onnx.add_argument(
        "model",
        metavar="MODEL",
        help="pretrained name, hf-hub:ORG/REPO, a local checkpoint directory, or an architecture",
    )
    onnx.add_argument(
        "--checkpoint", metavar="PATH", help="weights file (or directory) for an architecture name"
    )
    onnx.add_argument(
        "--output", "-o", metavar="DIR", help="output directory (default: the --backend onnx cache)"
    )
    onnx.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "int8"),
        help="int8 also writes dynamically quantised graphs (*.int8.onnx) (default fp32)",
    )
    onnx.set_defaults(func=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from clipserve.engine import onnx_backend
    from clipserve.engine.loading import build_module, resolve

    resolved = resolve(args.model, args.checkpoint)

    def build() -> torch.nn.Module:
        return build_module(resolved.model_cfg, resolved.state, resolved.source, torch.float32)

    if args.output:
        directory = onnx_backend.export(build(), args.output, precision=args.precision)
    else:
        directory = onnx_backend.ensure_exported(resolved.state, build, args.precision)
    print(directory, file=sys.stdout)
    return 0
