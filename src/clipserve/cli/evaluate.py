"""`clipserve eval` (one benchmark run, CLIP_benchmark's metrics and JSON) and `clipserve eval compare`."""

from __future__ import annotations

import argparse
import sys

from clipserve.cli.common import add_model_arguments, load_model
from clipserve.cli.main import CLIError

TASK_NAMES = "zeroshot_classification, zeroshot_retrieval or linear_probe"
EPILOG = """\
dataset specs (all local):
  imagefolder:PATH      one sub-directory of images per class
  csv:FILE, jsonl:FILE  image path (relative to the file) + label, or + caption(s)
  wds:DIR_OR_PATTERN    CLIP_benchmark WebDataset layout (DIR/{split}/*.tar, classnames.txt, ...) or shards
  imagenet:PATH         ImageNet-1k with val/ (and train/) of synset folders
  coco:PATH             COCO with Karpathy's dataset_coco.json next to val2014/
  flickr30k:PATH        Flickr30k with Karpathy's dataset_flickr30k.json and flickr30k-images/
  wds/NAME              download clip-benchmark/wds_NAME from the Hugging Face Hub (online only)

examples:
  clipserve eval --model ViT-B-32/datacomp_xl_s13b_b90k --task zeroshot_classification \\
      --dataset imagenet:~/data/imagenet --output imagenet.json
  clipserve eval compare a.json b.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="benchmark a model (zero-shot classification, retrieval, linear probe)",
        description="Evaluate a model the way LAION's CLIP_benchmark does and write its JSON.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # fp32 unless asked: an evaluation reproduces the model's published numbers (CLIP_benchmark runs fp32);
    # --precision int8 or bf16 measures what a faster path costs in accuracy
    add_model_arguments(p, positional=False, precision="fp32")
    p.add_argument("--task", help=TASK_NAMES)
    p.add_argument("--dataset", metavar="SPEC", help="what to evaluate on (specs below)")
    p.add_argument("--split", default="test", help="split of layouts that have them (default test)")
    p.add_argument("--language", default="en", help="prompt language: en, it, jp, cn, ar (default en)")
    p.add_argument("--templates", metavar="FILE", help="zero-shot templates, one per line or a JSON list ({c} = class)")
    p.add_argument("--classnames", metavar="FILE", help="class names in class-index order, one per line or a JSON list")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="retrieval k (default 1 5 10)")
    p.add_argument("--train-dataset", metavar="SPEC", help="linear probe training set (default: --train-split of --dataset)")
    p.add_argument("--train-split", default="train", help="linear probe training split (default train)")
    p.add_argument(
        "--val-proportion", type=float, default=0.2,
        help="share of the training set held out to choose the probe's weight decay; 0 = no sweep (default 0.2)",
    )
    p.add_argument("--epochs", type=int, default=10, help="linear probe epochs (default 10)")
    p.add_argument("--lr", type=float, default=0.1, help="linear probe learning rate (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="linear probe seed (default 0)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads (default 4)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the result as CLIP_benchmark JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)

    commands = p.add_subparsers(dest="eval_command", metavar="compare")
    c = commands.add_parser(
        "compare",
        help="side-by-side table of result files",
        description="Print the metrics of several result JSON files (clipserve or CLIP_benchmark) side by side.",
    )
    c.add_argument("results", nargs="+", metavar="RESULT.json")
    c.set_defaults(func=run_compare)


def _names(args: argparse.Namespace, model) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark records them: architecture and weights tag or path."""
    from clipserve import registry

    if args.checkpoint:
        return model.info.architecture, str(args.checkpoint)
    if args.model in registry.PRETRAINED:
        known = registry.pretrained(args.model)
        return known.architecture, known.tag
    return model.info.architecture, model.info.source


def run_eval(args: argparse.Namespace) -> int:
    from clipserve.eval.linear_probe import ProbeSettings
    from clipserve.eval.report import EvalResult, format_result
    from clipserve.eval.runner import EvalConfig, evaluate

    if not args.task or not args.dataset:
        raise CLIError(f"--task ({TASK_NAMES}) and --dataset SPEC are required (see clipserve eval --help)")
    config = EvalConfig(
        dataset=args.dataset,
        task=args.task,
        language=args.language,
        templates=args.templates,
        classnames=args.classnames,
        split=args.split,
        train_dataset=args.train_dataset,
        train_split=args.train_split,
        recall_k=tuple(args.recall_k),
        batch_size=args.batch_size,
        workers=args.workers,
        probe=ProbeSettings(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, val_proportion=args.val_proportion, seed=args.seed
        ),
        progress=not args.quiet,
    )
    config.validate()  # before the (possibly long) model download
    model = load_model(args)
    metrics = evaluate(model, config)
    name, pretrained = _names(args, model)
    result = EvalResult(args.dataset, name, pretrained, args.task, metrics, args.language)
    if args.output:
        result.write(args.output)
    print(format_result(result))
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from clipserve.eval.report import format_comparison, read_result

    results = [read_result(path) for path in args.results]
    print(format_comparison(results, args.results))
    return 0
