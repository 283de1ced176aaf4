"""`clipserve info | embed | classify | convert`: the runtime from the command line."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from clipserve.cli.common import FAST_DECODE_HELP, add_model_arguments, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="describe a model", description="Load a model and print what it is.")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_info)

    p = subparsers.add_parser(
        "embed",
        help="embed images or texts",
        description="Print one JSON line per input: {\"input\": ..., \"embedding\": [...]}, or write a .npy file.",
    )
    add_model_arguments(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", nargs="+", metavar="PATH", help="image files")
    group.add_argument("--text", nargs="+", metavar="TEXT", help="texts")
    p.add_argument("--no-normalize", action="store_true", help="raw (not L2-normalised) embeddings")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--output", "-o", metavar="FILE", help="write a float32 [N, D] array (.npy) instead of JSON lines")
    p.set_defaults(func=run_embed)

    p = subparsers.add_parser(
        "classify",
        help="zero-shot classify images",
        description="Zero-shot classification: rank candidate labels for each image.",
    )
    add_model_arguments(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--labels", required=True, help="candidate labels, comma-separated")
    p.add_argument(
        "--template", action="append", dest="templates", metavar="TEMPLATE",
        help="prompt template with {} for the label (repeatable; default 'a photo of a {}.')",
    )
    p.add_argument("--top-k", type=int, default=5, help="labels to show per image (default 5)")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_classify)

    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between open_clip and Hugging Face layouts",
        description="Write SRC as safetensors in the open_clip or Hugging Face CLIPModel layout. Lossless.",
    )
    p.add_argument("src", metavar="SRC", help="model name, hf-hub:ORG/REPO, directory, or architecture with --checkpoint")
    p.add_argument("dst", metavar="DST", help="output directory")
    p.add_argument("--format", required=True, choices=("open_clip", "hf"), help="output layout")
    p.add_argument("--checkpoint", metavar="PATH", help="weights file for an architecture name")
    p.set_defaults(func=run_convert)


def run_info(args: argparse.Namespace) -> int:
    model = load_model(args)
    info = model.info.as_dict()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    model = load_model(args)
    normalize = not args.no_normalize
    if args.image:
        inputs = args.image
        for path in inputs:
            if not Path(path).is_file():
                raise FileNotFoundError(f"no such image file: {path}")
        embeddings = model.encode_image(inputs, normalize=normalize, fast_decode=args.fast_decode)
    else:
        inputs = args.text
        embeddings = model.encode_text(inputs, normalize=normalize)
    if args.output:
        import numpy as np

        np.save(args.output, embeddings.numpy())
        print(f"wrote {tuple(embeddings.shape)} float32 embeddings to {args.output}", file=sys.stderr)
        return 0
    for item, vector in zip(inputs, embeddings.tolist(), strict=True):
        print(json.dumps({"input": item, "embedding": vector}))
    return 0


def run_classify(args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise ValueError("--labels needs at least two comma-separated labels")
    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such image file: {path}")
    model = load_model(args)
    probs = model.classify(args.images, labels, args.templates, fast_decode=args.fast_decode)
    results = []
    for path, row in zip(args.images, probs, strict=True):
        order = row.argsort(descending=True)[: args.top_k].tolist()
        results.append({"image": path, "labels": [{"label": labels[i], "probability": float(row[i])} for i in order]})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["image"])
        for entry in result["labels"]:
            bar = "#" * round(entry["probability"] * 30)
            print(f"  {entry['probability']:7.2%}  {bar:<30}  {entry['label']}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from clipserve.engine.loading import resolve
    from clipserve.io.checkpoints import write_directory

    resolved = resolve(args.src, args.checkpoint)
    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty: choose a new directory")
    write_directory(dst, resolved.state, resolved.model_cfg, resolved.preprocess_cfg, args.format)
    if resolved.tokenizer_file is not None:
        shutil.copyfile(resolved.tokenizer_file, dst / "tokenizer.json")
    print(f"wrote {args.format} checkpoint ({len(resolved.state)} tensors) to {dst}", file=sys.stderr)
    return 0
