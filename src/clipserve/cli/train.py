"""`clipserve train | probe`: contrastive training / fine-tuning, and linear probes on frozen features."""

from __future__ import annotations

import argparse
import functools
import logging

from clipserve.cli.common import add_model_arguments, load_model
from clipserve.cli.main import CLIError
from clipserve.train.config import PRECISIONS, TOWERS

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a CLIP contrastively",
        description=(
            "Contrastive (InfoNCE) training from scratch (--arch) or fine-tuning of any loadable model (--model). "
            "Runs as one process, or as N under torchrun (gloo on CPU, nccl on GPU). OUTPUT is a servable "
            "open_clip checkpoint directory that --resume continues exactly."
        ),
    )
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="model to fine-tune: pretrained name, hf-hub:ORG/REPO or checkpoint directory")
    start.add_argument("--arch", help="architecture to train from scratch: registry name or model_cfg JSON file")
    p.add_argument("--data", required=True, metavar="SPEC", help="training pairs: csv:FILE, jsonl:FILE, folder:DIR, wds:SHARDS")
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="per rank and micro-batch (default 64)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay (default 0.2)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before cosine decay (default 100)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast precision (default fp32)")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value")
    p.add_argument("--freeze", action="append", choices=TOWERS, default=[], help="do not train this tower (repeatable)")
    p.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower (see --lock-image-unlocked-groups)")
    p.add_argument("--lock-image-unlocked-groups", type=int, default=0, help="with --lock-image: train the last N layer groups")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between zero-shot evaluations (0: only at the end)")
    p.add_argument("--eval-data", metavar="SPEC", help="evaluation dataset, as `clipserve eval` names them "
                   "(e.g. imagefolder:DIR, csv:FILE, wds:DIR)")
    p.add_argument("--eval-task", default="zeroshot_classification",
                   choices=("zeroshot_classification", "zeroshot_retrieval"), help="what to evaluate on --eval-data")
    p.add_argument("--eval-templates", metavar="FILE", help="zero-shot prompt templates file (default: the dataset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between log lines (default 10)")
    p.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints (default: each epoch)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (resume later with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "probe",
        help="train a linear probe on frozen image features",
        description=(
            "Fit a linear classifier on a model's normalised image features and save it (probe.safetensors + "
            "probe.json) for a fixed-class classifier next to zero-shot."
        ),
    )
    add_model_arguments(p, positional=False)
    p.add_argument("--data", required=True, metavar="SPEC", help="labelled images, as `clipserve eval` names datasets "
                   "(e.g. imagefolder:DIR of class folders, csv:FILE with image and label columns)")
    p.add_argument("--split", default="train", help="dataset split to train on (default train)")
    p.add_argument("--output", required=True, metavar="DIR", help="probe directory")
    p.add_argument("--epochs", type=int, default=10, help="passes over the features (default 10)")
    p.add_argument("--val-proportion", type=float, default=0.2,
                   help="share held out to choose the weight decay, 0 for none (default 0.2)")
    p.set_defaults(func=run_probe)


def run_train(args: argparse.Namespace) -> int:
    from clipserve.eval.runner import EvalConfig, evaluate
    from clipserve.train.config import TrainConfig
    from clipserve.train.data import read_pairs
    from clipserve.train.trainer import starting_point, train

    cfg = TrainConfig(
        output=args.output, epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps,
        lr=args.lr, wd=args.wd, warmup=args.warmup, grad_clip=args.grad_clip, precision=args.precision,
        freeze=tuple(args.freeze), lock_image=args.lock_image,
        lock_image_unlocked_groups=args.lock_image_unlocked_groups, seed=args.seed, workers=args.workers,
        device=args.device, eval_every=args.eval_every, log_every=args.log_every, save_every=args.save_every,
        max_steps=args.max_steps, resume=args.resume, progress=not args.no_progress,
    )
    if args.eval_templates and not args.eval_data:
        raise CLIError("--eval-templates needs --eval-data")
    records = read_pairs(args.data)
    evaluator = None
    if args.eval_data:
        eval_cfg = EvalConfig(dataset=args.eval_data, task=args.eval_task, templates=args.eval_templates, progress=False)
        eval_cfg.validate()
        evaluator = functools.partial(evaluate, config=eval_cfg)  # the harness, on the weights being trained
    start = starting_point(model=args.model, arch=args.arch)
    result = train(cfg, start, records, evaluator)
    status = "finished" if result.finished else "stopped (continue with --resume)"
    log.info("%s at step %d: %s", status, result.step, result.output)
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from clipserve.eval.datasets import load_dataset
    from clipserve.eval.linear_probe import ProbeSettings
    from clipserve.train.probe import train_linear_probe

    settings = ProbeSettings(epochs=args.epochs, val_proportion=args.val_proportion)
    if settings.epochs < 1 or not 0 <= settings.val_proportion < 1:
        raise CLIError("--epochs must be at least 1 and --val-proportion in [0, 1)")
    dataset = load_dataset(args.data, args.split)
    model = load_model(args)
    probe = train_linear_probe(model, dataset, settings)
    directory = probe.save(args.output)
    print(f"linear probe over {len(probe.classes)} classes, {len(dataset.images)} images -> {directory}")
    return 0
